"""python -m pipeline analyze  ->  reports/oof/ (index.html, summary.json, analysis.json, figures/, tables/)

Reads every backbone's predictions/<backbone>/oof_probs.csv, the ensemble's submissions/oof_probs.csv,
the prepared images and each backbone's reports/train/<backbone>.json (its folds' curves and input size, for
the report's top lines) and reports/plan.json (what the plan chose: image_size and finetune auto); never the
test predictions. With `cv.holdout`, the held-out rows' scores from
reports/ensemble.json stand beside the OOF ones.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.analyze import analyze_stage, headline_line
from pipeline.cli import parse_args
from pipeline.config import flatten, load_params, to_dict
from pipeline.data import load_prepared
from pipeline.io import atomic_dir
from pipeline.paths import RunPaths
from pipeline.report import ReportRows, write_report
from pipeline.tracking import Tracker, experiment_name


def main(argv=None) -> None:
    args = parse_args(argv, __doc__)
    params = load_params(args.params)
    paths = RunPaths(Path("."))
    prepared = load_prepared(paths.prepared)
    data = prepared.validated_as_in(paths.submissions / "oof_probs.csv")  # the OOF's rows: the trained folds'
    found = analyze_stage(
        params, data, paths.predictions_root, paths.submissions, paths.report("ensemble"),
        lambda b: paths.report("train", b), paths.report("plan"),
    )  # fmt: skip
    title = f"Out-of-fold error analysis: {experiment_name(params)}"
    if len(data.train) < len(prepared.train):  # cv.train_folds: fewer folds trained
        title += f" (OOF of the trained folds: {len(data.train):,} of {len(prepared.train):,} training rows)"
    rows = ReportRows(data.train["id"].to_numpy(), data.targets, data.folds, data.classes, data.train_images, data.task)
    with atomic_dir(paths.oof_report) as tmp:
        write_report(
            tmp, found.analyses, found.diversity, found.per_class, found.headline, rows,
            params.analyze.examples_per_pair, title,
        )  # fmt: skip
    tracker = Tracker(params.tracking.enabled, experiment_name(params))
    with tracker.run(
        "analyze",
        params={f"analyze.{k}": v for k, v in flatten(to_dict(params.analyze)).items()},
        tags={"stage": "analyze"},
    ):
        numbers = flatten(found.headline)
        tracker.log_metrics(
            {k.replace("~", "_vs_"): v for k, v in numbers.items() if isinstance(v, (int, float)) and v == v}
        )
        tracker.log_artifacts(str(paths.oof_report), "oof")
    for a in found.analyses:
        print(headline_line(a, params.competition.metric, data.task.NEVER_PREDICTED_HINT))
    for step in found.analyses[-1].next_steps:  # the submission's
        print(f"next: {step['text']}")
    print(f"report -> {paths.oof_report / 'index.html'}")
