"""python -m pipeline timing  ->  reports/timing.json: planned against actual seconds per stage"""

from __future__ import annotations

from pathlib import Path

from pipeline.cli import parse_args
from pipeline.config import load_params
from pipeline.io import read_json, write_json
from pipeline.paths import RunPaths
from pipeline.timing import plan_vs_actual
from pipeline.tracking import Tracker, experiment_name


def _minutes(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds / 60:6.1f} min"


def main(argv=None) -> None:
    args = parse_args(argv, __doc__)
    params = load_params(args.params)
    backbones = list(params.train.backbones)
    stages = (
        ["prepare"]
        + ([f"tune@{b}" for b in backbones] if params.tune.enabled else [])
        + ["plan"]
        + [f"{s}@{b}" for b in backbones for s in ("train", "predict", "refit")]
        + ["ensemble", "analyze"]
    )
    paths = RunPaths(Path("."))
    report = plan_vs_actual(read_json(paths.report("plan")), {s: paths.timing(s) for s in stages})
    write_json(paths.report("timing"), report)
    tracker = Tracker(params.tracking.enabled, experiment_name(params))
    with tracker.run("timing", params={"budget_minutes": report["budget_minutes"]}, tags={"stage": "timing"}):
        # MLflow's names take no @: train@b is logged as train/b
        tracker.log_metrics(
            {
                f"{kind}_s.{stage.replace('@', '/')}": row[f"{kind}_s"]
                for stage, row in report["stages"].items()
                for kind in ("planned", "actual")
                if row[f"{kind}_s"] is not None
            }
        )
        tracker.log_artifact(str(paths.report("timing")))
    width = max(map(len, report["stages"]))
    for stage, row in report["stages"].items():
        print(f"{stage:<{width}}  planned {_minutes(row['planned_s']):>10}  actual {_minutes(row['actual_s']):>10}")
    ratio = report["actual_over_planned"]
    print(
        f"{'all':<{width}}  planned {_minutes(report['planned_total_seconds']):>10}  actual "
        f"{_minutes(report['actual_total_seconds']):>10}" + (f"  (actual/planned {ratio:.3f})" if ratio else "")
    )
