"""python -m pipeline analyze  ->  reports/oof/ (index.html, summary.json, analysis.json, figures/, tables/)

Reads every backbone's predictions/<backbone>/oof_probs.csv, the ensemble's submissions/oof_probs.csv
and the prepared images; never the test predictions. With `cv.holdout`, the held-out rows' scores from
reports/ensemble.json stand beside the OOF ones.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.analyze import analyze_all, attach_holdout, diversity, headline_line, per_class_accuracy, summary
from pipeline.cli import parse_args
from pipeline.config import flatten, load_params, to_dict
from pipeline.data import load_prepared
from pipeline.io import atomic_dir, read_json
from pipeline.paths import RunPaths
from pipeline.probs import read_probs
from pipeline.report import ReportRows, write_report
from pipeline.slices import image_properties
from pipeline.tracking import Tracker, experiment_name


def main(argv=None) -> None:
    args = parse_args(argv, __doc__)
    params = load_params(args.params)
    paths = RunPaths(Path("."))
    data = load_prepared(paths.prepared)
    ids, y, folds, backbones = data.train["id"].to_numpy(), data.targets, data.folds, list(params.train.backbones)
    oof = {b: read_probs(paths.predictions(b) / "oof_probs.csv", ids, data.classes, b) for b in backbones}
    ensemble = read_probs(paths.submissions / "oof_probs.csv", ids, data.classes, "ensemble")
    properties = image_properties(data.train_images, data.train.get("width"), data.train.get("height"))
    analyses = analyze_all(params, oof, ensemble, data, properties)
    if data.holdout is not None:
        attach_holdout(analyses, read_json(paths.report("ensemble")))
    div, per_class = diversity(oof, y), per_class_accuracy({a.label: a.probs for a in analyses}, y, data.classes)
    headline = summary(analyses, div)
    title = f"Out-of-fold error analysis: {experiment_name(params)}"
    rows = ReportRows(ids, y, folds, data.classes, data.train_images)
    with atomic_dir(paths.oof_report) as tmp:
        write_report(tmp, analyses, div, per_class, headline, rows, params.analyze.examples_per_pair, title)
    tracker = Tracker(params.tracking.enabled, experiment_name(params))
    with tracker.run(
        "analyze",
        params={f"analyze.{k}": v for k, v in flatten(to_dict(params.analyze)).items()},
        tags={"stage": "analyze"},
    ):
        tracker.log_metrics(
            {k.replace("~", "_vs_"): v for k, v in flatten(headline).items() if isinstance(v, (int, float)) and v == v}
        )
        tracker.log_artifacts(str(paths.oof_report), "oof")
    for a in analyses:
        print(headline_line(a, params.competition.metric))
    print(f"report -> {paths.oof_report / 'index.html'}")
