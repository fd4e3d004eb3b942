"""python -m pipeline ensemble  ->  submissions/, reports/ensemble.json, reports/metrics.json

Fits every method of `ensemble.methods` on the backbones' OOF probabilities and scores it honestly
by cross-fitting over the CV folds (fit on k-1 folds' OOF rows, score the held-out fold). Writes
  submissions/submission.csv               the chosen method (`ensemble.method`; auto = best honest score)
  submissions/methods/<method>-oof-<metric>-<score>.csv   one submission per method
  submissions/oof_probs.csv, test_probs.csv       the chosen method's honest OOF and test probabilities
  reports/metrics.json                     the headline numbers `dvc metrics show` / `dvc exp show` print
Test predictions and the answer file are never used to fit anything.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.cli import experiment_name, parse_args
from pipeline.config import ConfigError, load_params
from pipeline.data import load_prepared
from pipeline.ensemble import ENSEMBLES, choose_method, fit_methods
from pipeline.io import atomic_dir, atomic_write_text, read_json, write_json
from pipeline.metrics import METRICS, argbest, scores
from pipeline.probs import probs_frame, read_probs
from pipeline.submission import SubmissionFormat, build_submission, local_leaderboard, validate_submission
from pipeline.tracking import Tracker

PREPARED = Path("data/prepared")
SUBMISSIONS = Path("submissions")




def headline(metrics: dict, metric: str, chosen_by: str) -> dict:
    """The few numbers that tell runs apart, flat, for `dvc metrics show` and `dvc exp show` at 120
    columns: the submission's method and honest OOF score (the competition's `metric`, the one the
    method was `chosen_by`, and log loss) and its local leaderboard score if the competition has
    answers. Each backbone's scores, each method's, the TTA choices: reports/ensemble.json."""
    out = {"method": metrics["method"],
           **{m: round(metrics["oof"][m], 5) for m in dict.fromkeys([metric, chosen_by, "log_loss"])}}
    if metric in metrics.get("local_leaderboard", {}):
        out[f"lb_{metric}"] = round(metrics["local_leaderboard"][metric], 5)
    return out


def _single_report(backbone: str, oof: np.ndarray, y: np.ndarray) -> dict:
    """One backbone's OOF scores beside its predict stage's TTA choice, for the report."""
    path = Path(f"predictions/{backbone}/tta.json")
    tta = read_json(path) if path.exists() else {}
    return {"oof": scores(oof, y, METRICS), "tta": tta.get("policy"), "oof_no_tta": tta.get("policies", {}).get("none"),
            "oof_tta_selection_crossfit": tta.get("oof_selection_crossfit"), "seeds": tta.get("seeds")}


def main(argv=None) -> None:
    args = parse_args(argv, __doc__)
    params = load_params(args.params)
    cfg = params.ensemble
    backbones = list(params.train.backbones)
    bad = [m for m in cfg.methods if m not in ENSEMBLES]  # the registry's names; the rest was checked on reading
    if bad:
        raise ConfigError(f"{args.params}: ensemble.methods: unknown method '{bad[0]}' (known: {', '.join(ENSEMBLES)})")
    weights = [cfg.weights.get(b, 1.0) for b in backbones]

    data = load_prepared(PREPARED, images=False)
    y, folds = data.train["target"].to_numpy(), data.train["fold"].to_numpy()
    test_ids = data.test["id"].tolist()
    oof = [read_probs(f"predictions/{b}/oof_probs.csv", data.train["id"], data.classes, b) for b in backbones]
    test = [read_probs(f"predictions/{b}/test_probs.csv", test_ids, data.classes, b) for b in backbones]

    fitted, errors = fit_methods(cfg.methods, cfg.metric, weights, backbones, oof, test, y, folds)
    for name, reason in errors.items():
        print(f"ensemble method {name} skipped: {reason}")
    if not fitted:
        raise ConfigError(f"{args.params}: ensemble.methods: no method could be fitted")
    if cfg.method in errors:
        raise ConfigError(f"{args.params}: ensemble.method: {cfg.method} could not be fitted ({errors[cfg.method]})")
    chosen = choose_method(fitted, cfg.method, cfg.metric)
    methods = {name: fitted[name].report if name in fitted else {"error": errors[name]} for name in cfg.methods}

    sample = pd.read_csv(PREPARED / "sample_submission.csv", dtype=str, keep_default_na=False)
    fmt = SubmissionFormat(**read_json(PREPARED / "submission_format.json"))
    singles = {b: _single_report(b, probs, y) for b, probs in zip(backbones, oof)}
    best_single = backbones[argbest(cfg.metric, [singles[b]["oof"][cfg.metric] for b in backbones])]
    final = methods[chosen]["oof"]
    metrics = {
        "method": chosen, "metric": cfg.metric, "oof": final,
        "best_single": {"backbone": best_single, **singles[best_single]["oof"]},
        "gain_over_best_single": {m: final[m] - singles[best_single]["oof"][m] for m in final},
        "methods": methods, "backbones": singles,
    }
    answers = PREPARED / "answers.csv"
    with atomic_dir(SUBMISSIONS / "methods") as out:
        for name, fit in fitted.items():
            test_probs = fit.test
            submission = build_submission(test_ids, test_probs, data.classes, fmt)
            validate_submission(submission, sample, data.classes, fmt)
            file = f"{name}-oof-{cfg.metric}-{methods[name]['oof'][cfg.metric]:.4f}.csv"
            submission.to_csv(out / file, index=False)
            methods[name]["submission"] = f"{SUBMISSIONS}/methods/{file}"
            if answers.exists():  # reported only, never used to choose
                methods[name]["local_leaderboard"] = local_leaderboard(
                    pd.read_csv(answers, dtype=str, keep_default_na=False), test_ids, test_probs, data.classes)
    honest, test_probs = fitted[chosen].honest_oof, fitted[chosen].test
    atomic_write_text(SUBMISSIONS / "oof_probs.csv", probs_frame(data.train["id"], honest, data.classes).to_csv(index=False))
    atomic_write_text(SUBMISSIONS / "test_probs.csv", probs_frame(test_ids, test_probs, data.classes).to_csv(index=False))
    atomic_write_text(SUBMISSIONS / "submission.csv",
                      build_submission(test_ids, test_probs, data.classes, fmt).to_csv(index=False))
    if "local_leaderboard" in methods[chosen]:
        metrics["local_leaderboard"] = methods[chosen]["local_leaderboard"]
    write_json("reports/ensemble.json", metrics)
    write_json("reports/metrics.json", headline(metrics, params.competition.metric, cfg.metric))

    tracker = Tracker(params.tracking.enabled, experiment_name(params))
    with tracker.run("ensemble", params={"method": chosen, "metric": cfg.metric, "methods": ",".join(cfg.methods),
                                         **{f"weight_{b}": w for b, w in methods[chosen].get("weights", {}).items()}},
                     tags={"stage": "ensemble"}):
        tracker.log_metrics({f"oof_{m}": v for m, v in final.items()})
        tracker.log_metrics({f"gain_{m}": v for m, v in metrics["gain_over_best_single"].items()})
        if "local_leaderboard" in metrics:
            tracker.log_metrics({f"local_leaderboard_{m}": v for m, v in metrics["local_leaderboard"].items()})
        tracker.log_artifact(str(SUBMISSIONS / "submission.csv"))
        tracker.log_artifact(str(SUBMISSIONS / "oof_probs.csv"))
        tracker.log_artifact("reports/ensemble.json")
        tracker.log_candidates(
            {name: ({"method": name, **{f"weight_{b}": w for b, w in methods[name].get("weights", {}).items()}},
                    {**{f"oof_{m}": v for m, v in methods[name]["oof"].items()},
                     **{f"local_leaderboard_{m}": v for m, v in methods[name].get("local_leaderboard", {}).items()}})
             for name in fitted},
            chosen, tags={"stage": "ensemble"}, artifacts={name: methods[name]["submission"] for name in fitted})
    m, other = cfg.metric, "log_loss" if cfg.metric == "accuracy" else "accuracy"
    for name in fitted:
        print(f"{name:>13}: honest OOF {m} {methods[name]['oof'][m]:.4f}, {other} {methods[name]['oof'][other]:.4f}"
              + (" <- submission.csv" if name == chosen else ""))
    print(f"best single backbone {best_single}: OOF {m} {singles[best_single]['oof'][m]:.4f}; "
          f"gain of the ensemble ({chosen}) {metrics['gain_over_best_single'][m]:+.4f}")
