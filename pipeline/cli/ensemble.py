"""python -m pipeline ensemble  ->  submissions/{submission,oof_probs,test_probs}.csv, reports/ensemble.json

oof_probs.csv and test_probs.csv hold the ensemble's probabilities in the layout of
predictions/<backbone>/: the analyze stage reads the first, blending with other work can use both.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.cli import experiment_name, parse_args
from pipeline.config import ConfigError, load_params
from pipeline.data import load_prepared
from pipeline.ensemble import SoftVotingEnsemble, build_submission, local_leaderboard, validate_submission
from pipeline.io import atomic_write_text, write_json
from pipeline.metrics import scores
from pipeline.predict import probs_frame, read_probs
from pipeline.prepare import read_submission_format
from pipeline.tracking import Tracker

PREPARED = Path("data/prepared")
SUBMISSION = Path("submissions/submission.csv")
OOF_PROBS = Path("submissions/oof_probs.csv")
TEST_PROBS = Path("submissions/test_probs.csv")


def main(argv=None) -> None:
    args = parse_args(argv, __doc__)
    params = load_params(args.params)
    backbones = list(params.train.backbones)
    unknown = sorted(set(params.ensemble.weights) - set(backbones))
    if unknown:
        raise ConfigError(f"{args.params}: ensemble.weights.{unknown[0]} is not a key of train.backbones")
    weights = [params.ensemble.weights.get(b, 1.0) for b in backbones]

    data = load_prepared(PREPARED, images=False)
    y = data.train["target"].to_numpy()
    test_ids = data.test["id"].tolist()
    oof = [read_probs(f"predictions/{b}/oof_probs.csv", data.train["id"], data.classes, b) for b in backbones]
    test = [read_probs(f"predictions/{b}/test_probs.csv", test_ids, data.classes, b) for b in backbones]
    try:
        ensemble = SoftVotingEnsemble(weights).fit(oof, y)
    except ValueError as exc:
        raise ConfigError(f"{args.params}: ensemble.weights: {exc}") from None

    sample = pd.read_csv(PREPARED / "sample_submission.csv", dtype=str, keep_default_na=False)
    fmt = read_submission_format(sample, data.classes, str(PREPARED / "sample_submission.csv"))
    test_probs = ensemble.predict_proba(test)
    submission = build_submission(test_ids, test_probs, data.classes, fmt)
    validate_submission(submission, sample, data.classes, fmt)

    oof_probs = ensemble.predict_proba(oof)
    metrics = {
        "weights": dict(zip(backbones, ensemble.weights_.tolist())),
        "oof": scores(oof_probs, y),
        "backbones": {b: scores(p, y) for b, p in zip(backbones, oof)},
    }
    answers = PREPARED / "answers.csv"
    if answers.exists():
        answers_df = pd.read_csv(answers, dtype=str, keep_default_na=False)
        metrics["local_leaderboard"] = {"accuracy": local_leaderboard(answers_df, test_ids, test_probs, data.classes)}

    atomic_write_text(OOF_PROBS, probs_frame(data.train["id"], oof_probs, data.classes).to_csv(index=False))
    atomic_write_text(TEST_PROBS, probs_frame(test_ids, test_probs, data.classes).to_csv(index=False))
    atomic_write_text(SUBMISSION, submission.to_csv(index=False))
    write_json("reports/ensemble.json", metrics)
    tracker = Tracker(params.tracking.enabled, experiment_name(params))
    with tracker.run("ensemble", params={f"weight_{b}": w for b, w in metrics["weights"].items()},
                     tags={"stage": "ensemble"}):
        tracker.log_metrics({f"oof_{m}": v for m, v in metrics["oof"].items()})
        if "local_leaderboard" in metrics:
            tracker.log_metrics({"local_leaderboard_accuracy": metrics["local_leaderboard"]["accuracy"]})
        tracker.log_artifact(str(SUBMISSION))
    lb = metrics.get("local_leaderboard", {}).get("accuracy")
    print(f"ensemble OOF accuracy {metrics['oof']['accuracy']:.4f}"
          + (f", local leaderboard {lb:.4f}" if lb is not None else "") + f" -> {SUBMISSION}")
