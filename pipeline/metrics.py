"""Scores computed the same way for folds, OOF, ensembles and the local leaderboard."""
from __future__ import annotations

from typing import Callable

import numpy as np
from sklearn.metrics import f1_score


def accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    return float((probs.argmax(1) == y).mean())


def log_loss(probs: np.ndarray, y: np.ndarray, eps: float = 1e-15) -> float:
    """Mean negative log-probability of the true class (clipped like sklearn's log_loss)."""
    p = np.clip(probs[np.arange(len(y)), y], eps, 1.0)
    return float(-np.log(p).mean())


def macro_f1(probs: np.ndarray, y: np.ndarray) -> float:
    """Unweighted mean of the per-class F1 over all classes (a class never predicted counts as 0)."""
    return float(f1_score(y, probs.argmax(1), labels=np.arange(probs.shape[1]), average="macro", zero_division=0))


# name -> (function, greater is better)
METRICS: dict[str, tuple[Callable[[np.ndarray, np.ndarray], float], bool]] = {
    "accuracy": (accuracy, True),
    "log_loss": (log_loss, False),
    "macro_f1": (macro_f1, True),
}


def is_better(metric: str, new: float, old: float) -> bool:
    return new > old if METRICS[metric][1] else new < old


def scores(probs: np.ndarray, y: np.ndarray, names=("accuracy", "log_loss")) -> dict[str, float]:
    """{name: score} for each metric in `names` (all of METRICS: pass METRICS)."""
    return {name: METRICS[name][0](probs, y) for name in names}
