"""python -m pipeline ensemble  ->  submissions/, reports/ensemble.json, reports/metrics.json

Fits every method of `ensemble.methods` on the backbones' OOF probabilities and scores it honestly
by cross-fitting over the CV folds (fit on k-1 folds' OOF rows, score the held-out fold). Writes
  submissions/submission.csv               the chosen method (`ensemble.method`; auto = best honest score)
  submissions/methods/<method>-oof-<metric>-<score>.csv   one submission per method
  submissions/oof_probs.csv, test_probs.csv       the chosen method's honest OOF and test probabilities
  reports/metrics.json                     the headline numbers `dvc metrics show` / `dvc exp show` print
Test predictions, the answer file and the `cv.holdout` rows (scored per method in reports/ensemble.json
and as holdout_<metric> in reports/metrics.json) are never used to fit or choose anything.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pipeline.cli import parse_args
from pipeline.config import load_params
from pipeline.data import load_prepared
from pipeline.ensemble import fit_stage, headline, log_stage, stage_report, summary_lines, write_submissions
from pipeline.io import write_json
from pipeline.paths import RunPaths
from pipeline.tracking import Tracker, experiment_name


def main(argv=None) -> None:
    args = parse_args(argv, __doc__)
    params = load_params(args.params)
    paths = RunPaths(Path("."))
    params = replace(params, refit=params.refit.planned(paths.plan_dir, next(iter(params.train.backbones))))
    data = load_prepared(paths.prepared, images=False)
    data = data.validated_as_in(paths.predictions(next(iter(params.train.backbones))) / "oof_probs.csv")
    run = fit_stage(params, data, paths.predictions_root, args.params, paths.refit_root)
    report = stage_report(run, write_submissions(run, data, paths.prepared, paths.submissions))
    write_json(paths.report("ensemble"), report)
    write_json(paths.report("metrics"), headline(report, params.competition.metric, params.ensemble.metric))
    tracker = Tracker(params.tracking.enabled, experiment_name(params))
    log_stage(run, report, tracker, paths.submissions, str(paths.report("ensemble")))
    print("\n".join(summary_lines(report, params.ensemble.metric)))
