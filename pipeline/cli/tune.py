"""python -m pipeline tune --backbone NAME  ->  tuning/NAME/{best_params.yaml,history.png,importances.png},
reports/tune/NAME.json

With tune.enabled false it writes an empty best_params.yaml, so the train stage's inputs exist either way.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.backbone import resolve_backbone
from pipeline.cli import build_parser, load_with_backbone
from pipeline.data import load_prepared
from pipeline.io import write_json
from pipeline.models import pick_device
from pipeline.paths import RunPaths
from pipeline.tasks import check_params
from pipeline.tune import tune_stage, write_disabled


def main(argv=None) -> None:
    parser = build_parser(__doc__, backbone=True)
    parser.add_argument("--worker", type=int, default=0, help="worker number when several share one study")
    args = parser.parse_args(argv)
    params, name = load_with_backbone(args)
    paths = RunPaths(Path("."))
    report = paths.report("tune", name)
    if not params.tune.enabled:
        write_disabled(paths.tuning(name))
        write_json(report, {"enabled": False})
        return print(f"tune {name}: tune.enabled is false, nothing to tune")
    data = load_prepared(paths.prepared)
    base = resolve_backbone(params, name, data.train_images.shape[1], args.params)
    check_params(params, data.task, args.params, base.settings.monitor)  # before any trial
    summary = tune_stage(params, base, data, pick_device(), paths.tuning(name), worker=args.worker)
    write_json(report, {"enabled": True, **{k: v for k, v in summary.items() if k != "best_params"}})
    print(
        f"tune {name}: best {params.tune.metric} {summary.get('best_value')} with {summary.get('best_params')} "
        f"({summary['n_complete']} complete, {summary['n_pruned']} pruned, {summary['n_failed']} failed)"
    )
