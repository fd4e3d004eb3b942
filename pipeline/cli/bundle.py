"""python -m pipeline bundle [--out bundle] [--method NAME] [--kaggle-id USER/SLUG] [--no-verify]  ->  bundle/,
reports/bundle.json

The offline inference bundle of a finished run for a Kaggle code competition (pipeline/bundle.py): the
submission's fold models, TTA and ensemble in one flat folder to upload as a Kaggle dataset. Before it
replaces the previous bundle, its predict.py runs on the local test images in a process that cannot
import mlflow, optuna or dvc, and must reproduce the method's submission (labels equal, probabilities
within 1e-5); its size and speed go to reports/bundle.json.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.bundle import verify_bundle, write_bundle
from pipeline.cli import build_parser
from pipeline.config import load_params
from pipeline.io import atomic_dir, write_json
from pipeline.paths import RunPaths


def main(argv=None) -> None:
    parser = build_parser(__doc__)
    parser.add_argument("--out", default="bundle", help="the bundle folder (default: bundle)")
    parser.add_argument("--method", help="a fitted ensemble method (default: the one behind submission.csv)")
    parser.add_argument("--kaggle-id", help="dataset-metadata.json's id, USER/SLUG (default: $KAGGLE_USERNAME/...)")
    parser.add_argument("--no-verify", action="store_true", help="skip the check against the local test set")
    args = parser.parse_args(argv)
    params, run = load_params(args.params), RunPaths(Path("."))
    with atomic_dir(args.out) as folder:
        spec = write_bundle(params, run, folder, args.method, args.kaggle_id)
        method, report = spec["ensemble"]["method"], {"method": spec["ensemble"]["method"]}
        report["models"] = sum(len(m["models"]) for m in spec["members"])
        if not args.no_verify:
            report.update(verify_bundle(folder, params.competition, method, run))
    write_json(run.report("bundle"), report)
    figures = ", ".join(f"{k} {v}" for k, v in report.items() if k not in ("method", "models"))
    print(f"wrote {args.out}/ ({method}, {report['models']} models): {figures or 'not verified'}")
    if "KAGGLE_USERNAME/" in (Path(args.out) / "dataset-metadata.json").read_text():
        print(f"before `kaggle datasets create -p {args.out}`: set its id (--kaggle-id USER/SLUG, $KAGGLE_USERNAME)")
