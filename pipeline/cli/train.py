"""python -m pipeline train --backbone NAME  ->  models/NAME/, reports/train/NAME.json"""
from __future__ import annotations

import dataclasses

import yaml

from pipeline.cli import experiment_name, load_with_backbone, parse_args
from pipeline.config import ConfigError, flatten, to_dict
from pipeline.data import load_prepared
from pipeline.io import atomic_dir, write_json
from pipeline.models import check_backbone, pick_device
from pipeline.predict import probs_frame
from pipeline.tracking import Tracker
from pipeline.train import resolve_settings, train_backbone


def main(argv=None) -> None:
    args = parse_args(argv, __doc__, backbone=True)
    params, backbone = load_with_backbone(args)
    overrides = params.train.backbones[backbone]
    model_name = overrides.model or backbone
    check_backbone(model_name, f"{args.params}: train.backbones.{backbone}")
    if params.train.monitor not in ("accuracy", "log_loss"):
        raise ConfigError(f"{args.params}: train.monitor must be 'accuracy' or 'log_loss', got '{params.train.monitor}'")

    data = load_prepared()
    settings = resolve_settings(params.train, overrides, data.train_images.shape[1])
    drop_rate = params.train.drop_rate if overrides.drop_rate is None else overrides.drop_rate
    device = pick_device()
    resolved = {"backbone": backbone, "model": model_name, "pretrained": overrides.pretrained,
                "drop_rate": drop_rate, "device": device.type, **dataclasses.asdict(settings),
                "n_folds": data.n_folds, "n_train": len(data.train), "n_classes": len(data.classes)}
    print(f"train {backbone} ({model_name}) on {device.type}: {data.n_folds} folds x {settings.epochs} epochs")

    tracker = Tracker(params.tracking.enabled, experiment_name(params))
    with tracker.run(backbone, params=flatten(resolved), tags={"stage": "train", "backbone": backbone}):
        with atomic_dir(f"models/{backbone}") as out:
            oof, metrics = train_backbone(data, model_name, settings, out, device, tracker,
                                          pretrained=overrides.pretrained, drop_rate=drop_rate)
            probs_frame(data.train["id"], oof, data.classes).to_csv(out / "oof_probs.csv", index=False)
            (out / "params.yaml").write_text(yaml.safe_dump({"resolved": resolved, "params": to_dict(params)}))
        tracker.log_metrics({f"cv_{m}": v for m, v in metrics["oof"].items()})
        tracker.log_metrics({f"cv_fold_mean_{m}": v for m, v in metrics["fold_mean"].items()})
    write_json(f"reports/train/{backbone}.json", metrics)
    print(f"{backbone}: OOF accuracy {metrics['oof']['accuracy']:.4f}, log loss {metrics['oof']['log_loss']:.4f}")
