"""python -m pipeline predict --backbone NAME  ->  predictions/NAME/{oof,test}_probs.csv, reports/predict/NAME.json"""
from __future__ import annotations

from pipeline.cli import load_with_backbone, parse_args
from pipeline.data import load_prepared
from pipeline.io import atomic_dir, write_json
from pipeline.metrics import scores
from pipeline.models import pick_device
from pipeline.predict import predict_backbone, probs_frame


def main(argv=None) -> None:
    args = parse_args(argv, __doc__, backbone=True)
    params, backbone = load_with_backbone(args)
    data = load_prepared()
    oof, test = predict_backbone(data, f"models/{backbone}", params.predict.hflip_tta, params.predict.batch_size,
                                 pick_device())
    with atomic_dir(f"predictions/{backbone}") as out:
        probs_frame(data.train["id"], oof, data.classes).to_csv(out / "oof_probs.csv", index=False)
        probs_frame(data.test["id"], test, data.classes).to_csv(out / "test_probs.csv", index=False)
    metrics = {"hflip_tta": params.predict.hflip_tta, "oof": scores(oof, data.train["target"].to_numpy())}
    write_json(f"reports/predict/{backbone}.json", metrics)
    print(f"{backbone}: OOF accuracy with this TTA policy {metrics['oof']['accuracy']:.4f}")
