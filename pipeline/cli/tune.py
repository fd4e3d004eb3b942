"""python -m pipeline tune --backbone NAME  ->  tuning/NAME/{best_params.yaml,history.png,importances.png},
reports/tune/NAME.json

With tune.enabled false it writes an empty best_params.yaml, so the train stage's inputs exist either way.
"""
from __future__ import annotations

import yaml

from pipeline.cli import build_parser, experiment_name, load_with_backbone
from pipeline.config import resolve_train_settings
from pipeline.data import load_prepared
from pipeline.io import atomic_dir, write_json
from pipeline.models import check_backbone, pick_device
from pipeline.tracking import Tracker
from pipeline.train import input_size
from pipeline.tune import finished, make_objective, open_study, run_study, search_space, write_report


def main(argv=None) -> None:
    parser = build_parser(__doc__, backbone=True)
    parser.add_argument("--worker", type=int, default=0, help="worker number when several share one study")
    args = parser.parse_args(argv)
    params, backbone = load_with_backbone(args)
    tune = params.tune
    out_dir, report = f"tuning/{backbone}", f"reports/tune/{backbone}.json"
    if not tune.enabled:
        with atomic_dir(out_dir) as out:
            (out / "best_params.yaml").write_text(yaml.safe_dump({"enabled": False, "params": {}}))
        write_json(report, {"enabled": False})
        print(f"tune {backbone}: tune.enabled is false, nothing to tune")
        return

    entry = params.train.backbones[backbone]
    model_name = entry.model or backbone
    check_backbone(model_name, f"{args.params}: train.backbones.{backbone}")
    space = search_space(tune, backbone)
    base = resolve_train_settings(params.train, backbone)
    data = load_prepared()
    image_size = input_size(base, model_name, entry.pretrained, data.train_images.shape[1])
    study_name = f"{experiment_name(params)}-{backbone}"
    study = open_study(tune, study_name, worker=args.worker)
    print(f"tune {backbone}: study '{study_name}', {finished(study)}/{tune.n_trials} trials finished so far")

    tracker = Tracker(params.tracking.enabled, experiment_name(params))
    with tracker.run(f"tune {backbone}", params={"study": study_name, "n_trials": tune.n_trials,
                                                 "folds": str(tune.folds), "epochs": tune.epochs,
                                                 "metric": tune.metric, "space": str(space)},
                     tags={"stage": "tune", "backbone": backbone}):
        objective = make_objective(data, model_name, base, space, tune, image_size, pick_device(), tracker,
                                   pretrained=entry.pretrained)
        run_study(study, objective, tune.n_trials, f"tune@{backbone}")
        with atomic_dir(out_dir) as out:
            summary = write_report(study, out)
            best = {"enabled": True, "study": study_name, "metric": tune.metric,
                    "value": summary.get("best_value"), "trial": summary.get("best_trial"),
                    "params": summary.get("best_params", {})}
            (out / "best_params.yaml").write_text(yaml.safe_dump(best, sort_keys=False))
        tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    write_json(report, {"enabled": True, **{k: v for k, v in summary.items() if k != "best_params"}})
    print(f"tune {backbone}: best {tune.metric} {summary.get('best_value')} with {summary.get('best_params')} "
          f"({summary['n_complete']} complete, {summary['n_pruned']} pruned, {summary['n_failed']} failed)")
