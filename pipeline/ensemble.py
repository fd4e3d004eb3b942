"""`ensemble` stage: soft voting of the backbones, then a validated submission.

    python -m pipeline ensemble    # writes submissions/submission.csv and reports/ensemble.json
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.prepare import SubmissionFormat


class SoftVotingEnsemble:
    """Weighted mean of class probabilities (scikit-learn estimator contract).

    `fit(probs_list, y)` checks the members and normalises the weights into `weights_`;
    `predict_proba(probs_list)` is `np.average(probs, axis=0, weights=weights_)`.
    """

    def __init__(self, weights=None):
        self.weights = weights

    def fit(self, probs_list: list[np.ndarray], y: np.ndarray) -> "SoftVotingEnsemble":
        probs = self._stack(probs_list)
        if len(y) != probs.shape[1]:
            raise ValueError(f"y has {len(y)} rows, the probabilities {probs.shape[1]}")
        weights = np.ones(len(probs_list)) if self.weights is None else np.asarray(self.weights, dtype=float)
        if weights.shape != (len(probs_list),) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be {len(probs_list)} non-negative numbers with a positive sum, got {self.weights}")
        self.weights_ = weights / weights.sum()
        self.n_classes_ = probs.shape[2]
        self.classes_ = np.arange(self.n_classes_)
        return self

    def predict_proba(self, probs_list: list[np.ndarray]) -> np.ndarray:
        if not hasattr(self, "weights_"):
            raise RuntimeError("SoftVotingEnsemble is not fitted yet: call fit() first")
        probs = self._stack(probs_list)
        if probs.shape[0] != len(self.weights_) or probs.shape[2] != self.n_classes_:
            raise ValueError(f"expected {len(self.weights_)} members with {self.n_classes_} classes, got {probs.shape}")
        return np.average(probs, axis=0, weights=self.weights_)

    def predict(self, probs_list: list[np.ndarray]) -> np.ndarray:
        return self.predict_proba(probs_list).argmax(1)

    @staticmethod
    def _stack(probs_list) -> np.ndarray:
        if len(probs_list) == 0:
            raise ValueError("no member probabilities given")
        shapes = {np.shape(p) for p in probs_list}
        if len(shapes) != 1:
            raise ValueError(f"member probabilities differ in shape: {sorted(shapes)}")
        return np.stack(probs_list)


def build_submission(test_ids: list[str], probs: np.ndarray, classes: list[str], fmt: SubmissionFormat) -> pd.DataFrame:
    """The sample submission's layout filled with predictions mapped back to the original labels."""
    if fmt.kind == "label":
        values = {fmt.columns[0]: np.asarray(classes, dtype=object)[probs.argmax(1)]}
    else:
        index = {c: i for i, c in enumerate(classes)}
        values = {c: probs[:, index[c]] for c in fmt.columns}
    frame = pd.DataFrame(values)
    frame.insert(0, fmt.id_column, test_ids)
    return frame


def validate_submission(sub: pd.DataFrame, sample: pd.DataFrame, classes: list[str], fmt: SubmissionFormat) -> None:
    """Raise PipelineError unless `sub` has the sample's columns, ids and order, and valid values."""
    if list(sub.columns) != list(sample.columns):
        raise PipelineError(f"submission columns {list(sub.columns)} differ from the sample's {list(sample.columns)}")
    ids, expected = sub[fmt.id_column].astype(str).tolist(), sample[fmt.id_column].astype(str).tolist()
    if ids != expected:
        row = next((i for i, (a, b) in enumerate(zip(ids, expected)) if a != b), min(len(ids), len(expected)))
        raise PipelineError(f"submission row {row + 2}: ids differ from sample_submission.csv "
                            f"({len(ids)} vs {len(expected)} rows)")
    values = sub[fmt.columns]
    if values.isna().any().any():
        raise PipelineError("submission has empty predictions")
    if fmt.kind == "label":
        bad = ~values.iloc[:, 0].astype(str).isin(set(classes))
        if bad.any():
            raise PipelineError(f"submission row {int(np.flatnonzero(bad)[0]) + 2}: label is not a class of train.csv")
    else:
        p = values.to_numpy(dtype=float)
        if (p < 0).any() or (p > 1).any() or not np.allclose(p.sum(1), 1.0, atol=1e-4):
            raise PipelineError("submission probabilities must lie in [0, 1] and sum to 1 per row")


def local_leaderboard(answers: pd.DataFrame, test_ids: list[str], probs: np.ndarray, classes: list[str]) -> float:
    """Accuracy against the competition's answer file (id, label). Only reported, never fitted on."""
    id_col, label_col = answers.columns[:2]
    truth = dict(zip(answers[id_col].astype(str), answers[label_col].astype(str)))
    missing = [i for i in test_ids if i not in truth]
    if missing:
        raise PipelineError(f"answers.csv: no row for test id '{missing[0]}' ({len(missing)} missing)")
    predicted = np.asarray(classes, dtype=object)[probs.argmax(1)]
    return float(np.mean([p == truth[i] for i, p in zip(test_ids, predicted)]))
