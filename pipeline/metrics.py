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


def direction(metric: str) -> str:
    """Optuna's word for the metric's direction: "maximize" or "minimize"."""
    return "maximize" if METRICS[metric][1] else "minimize"


def is_better(metric: str, new: float, old: float) -> bool:
    """The one comparator: `new` strictly better than `old` under `metric` (a tie is not better)."""
    return new > old if METRICS[metric][1] else new < old


def argbest(metric: str, values) -> int:
    """Index of the best of `values` under `metric` (the first of equals)."""
    values = np.asarray(values)
    return int(values.argmax() if METRICS[metric][1] else values.argmin())


def fold_spread(values) -> tuple[float, float]:
    """Mean and standard deviation of per-fold scores; the std is the sample one (ddof=1) over the
    k folds, as CV reports it, and 0 for a single fold."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def fold_summary(per_fold: dict[str, dict[str, float]], names=("accuracy", "log_loss")) -> dict[str, dict]:
    """{"fold_mean": {name: ...}, "fold_std": {name: ...}} over per-fold score dicts, by `fold_spread`."""
    spread = {m: fold_spread([f[m] for f in per_fold.values()]) for m in names}
    return {"fold_mean": {m: v[0] for m, v in spread.items()}, "fold_std": {m: v[1] for m, v in spread.items()}}


def scores(probs: np.ndarray, y: np.ndarray, names=("accuracy", "log_loss")) -> dict[str, float]:
    """{name: score} for each metric in `names` (all of METRICS: pass METRICS)."""
    return {name: METRICS[name][0](probs, y) for name in names}
