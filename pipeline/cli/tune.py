"""python -m pipeline tune --backbone NAME  ->  tuning/NAME/{best_params.yaml,history.png,importances.png},
reports/tune/NAME.json

With tune.enabled false it writes an empty best_params.yaml, so the train stage's inputs exist either way.
"""

from __future__ import annotations

from pipeline.backbone import resolve_backbone
from pipeline.cli import build_parser, load_with_backbone
from pipeline.data import load_prepared
from pipeline.io import write_json
from pipeline.models import pick_device
from pipeline.tracking import Tracker, experiment_name
from pipeline.tune import finished, make_objective, open_study, run_study, search_space, write_best, write_disabled


def main(argv=None) -> None:
    parser = build_parser(__doc__, backbone=True)
    parser.add_argument("--worker", type=int, default=0, help="worker number when several share one study")
    args = parser.parse_args(argv)
    params, name = load_with_backbone(args)
    tune, out_dir, report = params.tune, f"tuning/{name}", f"reports/tune/{name}.json"
    if not tune.enabled:
        write_disabled(out_dir)
        write_json(report, {"enabled": False})
        return print(f"tune {name}: tune.enabled is false, nothing to tune")
    data = load_prepared()
    space = search_space(tune, name)
    base = resolve_backbone(params, name, data.train_images.shape[1], args.params, tuned=False)
    study_name = f"{experiment_name(params)}-{name}"
    study = open_study(tune, study_name, worker=args.worker)
    print(f"tune {name}: study '{study_name}', {finished(study)}/{tune.n_trials} trials finished so far")
    tracker = Tracker(params.tracking.enabled, experiment_name(params))
    with tracker.run(
        f"tune {name}",
        params={
            "study": study_name,
            "n_trials": tune.n_trials,
            "folds": str(tune.folds),
            "epochs": tune.epochs,
            "metric": tune.metric,
            "space": str(space),
        },
        tags={"stage": "tune", "backbone": name},
    ):
        objective = make_objective(
            data,
            base.model_name,
            base.settings,
            space,
            tune,
            base.image_size,
            pick_device(),
            tracker,
            pretrained=base.pretrained,
        )
        run_study(study, objective, tune.n_trials, f"tune@{name}")
        summary = write_best(study, tune, out_dir)
        tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    write_json(report, {"enabled": True, **{k: v for k, v in summary.items() if k != "best_params"}})
    print(
        f"tune {name}: best {tune.metric} {summary.get('best_value')} with {summary.get('best_params')} "
        f"({summary['n_complete']} complete, {summary['n_pruned']} pruned, {summary['n_failed']} failed)"
    )
