"""Scores computed the same way for folds, OOF, ensembles and the local leaderboard."""

from __future__ import annotations

from typing import Callable

import numpy as np
from sklearn.metrics import cohen_kappa_score, f1_score, roc_auc_score


def accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    return float((probs.argmax(1) == y).mean())


def log_loss(probs: np.ndarray, y: np.ndarray, eps: float = 1e-15) -> float:
    """Mean negative log-probability of the true class (clipped like sklearn's log_loss)."""
    p = np.clip(probs[np.arange(len(y)), y], eps, 1.0)
    return float(-np.log(p).mean())


def macro_f1(probs: np.ndarray, y: np.ndarray) -> float:
    """Unweighted mean of the per-class F1 over all classes (a class never predicted counts as 0)."""
    return float(f1_score(y, probs.argmax(1), labels=np.arange(probs.shape[1]), average="macro", zero_division=0))


def roc_auc(probs: np.ndarray, y: np.ndarray) -> float:
    """Binary: the AUC of the second class's probability. Multiclass: the unweighted mean of each
    class's one-vs-rest AUC, over the classes present with both positives and negatives (as sklearn's
    `multi_class="ovr", average="macro"`, which refuses data missing a class); nan if there is none."""
    if probs.shape[1] == 2:
        return float(roc_auc_score(y, probs[:, 1])) if len(np.unique(y)) == 2 else float("nan")
    aucs = [roc_auc_score(y == c, probs[:, c]) for c in range(probs.shape[1]) if 0 < (y == c).sum() < len(y)]
    return float(np.mean(aucs)) if aucs else float("nan")


def quadratic_weighted_kappa(probs: np.ndarray, y: np.ndarray) -> float:
    """Cohen's kappa of the argmax with quadratic weights: class indices are the ordinal grades
    (prepare orders integer labels numerically). 1 = perfect, 0 = chance."""
    predicted = probs.argmax(1)
    if (predicted == y).all():
        return 1.0  # sklearn gives nan when a single grade is both predicted and true
    return float(cohen_kappa_score(y, predicted, weights="quadratic", labels=np.arange(probs.shape[1])))


# name -> (function, greater is better)
METRICS: dict[str, tuple[Callable[[np.ndarray, np.ndarray], float], bool]] = {
    "accuracy": (accuracy, True),
    "log_loss": (log_loss, False),
    "macro_f1": (macro_f1, True),
    "roc_auc": (roc_auc, True),
    "quadratic_weighted_kappa": (quadratic_weighted_kappa, True),
}


def direction(metric: str) -> str:
    """Optuna's word for the metric's direction: "maximize" or "minimize"."""
    return "maximize" if METRICS[metric][1] else "minimize"


def is_better(metric: str, new: float, old: float) -> bool:
    """The one comparator: `new` strictly better than `old` under `metric` (a tie is not better)."""
    return new > old if METRICS[metric][1] else new < old


def is_better_scores(metric: str, new: dict, best: dict | None) -> bool:
    """Validation scores `new` better than `best` under `metric`, a tie broken by log loss."""
    if best is None:
        return True
    if new[metric] != best[metric]:
        return is_better(metric, new[metric], best[metric])
    return is_better("log_loss", new["log_loss"], best["log_loss"])


def argbest(metric: str, values) -> int:
    """Index of the best of `values` under `metric` (the first of equals)."""
    values = np.asarray(values)
    return int(values.argmax() if METRICS[metric][1] else values.argmin())


def fold_spread(values) -> tuple[float, float]:
    """Mean and standard deviation of per-fold scores; the std is the sample one (ddof=1) over the
    k folds, as CV reports it, and 0 for a single fold."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def fold_summary(per_fold: dict[str, dict[str, float]], names=tuple(METRICS)) -> dict[str, dict]:
    """{"fold_mean": {name: ...}, "fold_std": {name: ...}} over per-fold score dicts, by `fold_spread`."""
    spread = {m: fold_spread([f[m] for f in per_fold.values()]) for m in names}
    return {"fold_mean": {m: v[0] for m, v in spread.items()}, "fold_std": {m: v[1] for m, v in spread.items()}}


def scores(probs: np.ndarray, y: np.ndarray, names=tuple(METRICS)) -> dict[str, float]:
    """{name: score} for each metric in `names` (all of METRICS by default)."""
    return {name: METRICS[name][0](probs, y) for name in names}
