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

from pathlib import Path

from pipeline.cli import parse_args
from pipeline.config import load_params
from pipeline.data import load_prepared
from pipeline.ensemble import fit_stage, headline, log_stage, write_submissions
from pipeline.io import write_json
from pipeline.tracking import Tracker, experiment_name

PREPARED, SUBMISSIONS, REPORT = Path("data/prepared"), Path("submissions"), "reports/ensemble.json"


def main(argv=None) -> None:
    args = parse_args(argv, __doc__)
    params = load_params(args.params)
    data = load_prepared(PREPARED, images=False)
    run = fit_stage(params, data, args.params)
    write_submissions(run, data, PREPARED, SUBMISSIONS)
    metrics, m = run.metrics, params.ensemble.metric
    write_json(REPORT, metrics)
    write_json("reports/metrics.json", headline(metrics, params.competition.metric, m))
    log_stage(run, Tracker(params.tracking.enabled, experiment_name(params)), SUBMISSIONS, REPORT)
    other = "log_loss" if m == "accuracy" else "accuracy"
    for name in run.fitted:
        print(
            f"{name:>13}: honest OOF {m} {metrics['methods'][name]['oof'][m]:.4f}, "
            f"{other} {metrics['methods'][name]['oof'][other]:.4f}"
            + (f"; holdout {m} {metrics['methods'][name]['holdout'][m]:.4f}" if "holdout" in metrics else "")
            + (" <- submission.csv" if name == run.chosen else "")
        )
    best = metrics["best_single"]
    print(
        f"best single backbone {best['backbone']}: OOF {m} {best[m]:.4f}; "
        f"gain of the ensemble ({run.chosen}) {metrics['gain_over_best_single'][m]:+.4f}"
    )
