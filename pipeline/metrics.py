"""Comparing scores, the same way for epochs, trials, TTA policies, ensemble methods and folds. The score
functions themselves are the task's (`pipeline.tasks`: each task's METRICS, with their directions)."""

from __future__ import annotations

import numpy as np

from pipeline.tasks import greater_is_better


def direction(metric: str) -> str:
    """Optuna's word for the metric's direction: "maximize" or "minimize"."""
    return "maximize" if greater_is_better(metric) else "minimize"


def is_better(metric: str, new: float, old: float) -> bool:
    """The one comparator: `new` strictly better than `old` under `metric` (a tie is not better)."""
    return new > old if greater_is_better(metric) else new < old


def is_better_scores(metric: str, new: dict, best: dict | None) -> bool:
    """Validation scores `new` better than `best` under `metric`, a tie broken by log loss (a regression's:
    by RMSE)."""
    if best is None:
        return True
    if new[metric] != best[metric]:
        return is_better(metric, new[metric], best[metric])
    tie = proxy_of(new)
    return is_better(tie, new[tie], best[tie])


def proxy_of(scores: dict) -> str:
    """The smooth metric among a task's `scores`: log loss, or a regression's RMSE."""
    return "log_loss" if "log_loss" in scores else "rmse"


def argbest(metric: str, values) -> int:
    """Index of the best of `values` under `metric` (the first of equals)."""
    values = np.asarray(values)
    return int(values.argmax() if greater_is_better(metric) else values.argmin())


def fold_spread(values) -> tuple[float, float]:
    """Mean and standard deviation of per-fold scores; the std is the sample one (ddof=1) over the
    k folds, as CV reports it, and 0 for a single fold."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def fold_summary(per_fold: dict[str, dict[str, float]], names) -> dict[str, dict]:
    """{"fold_mean": {name: ...}, "fold_std": {name: ...}} over per-fold score dicts, by `fold_spread`."""
    spread = {m: fold_spread([f[m] for f in per_fold.values()]) for m in names}
    return {"fold_mean": {m: v[0] for m, v in spread.items()}, "fold_std": {m: v[1] for m, v in spread.items()}}


def best_policy(oof: dict[str, np.ndarray], y: np.ndarray, rows: np.ndarray, metric: str, task) -> str:
    """The policy whose OOF predictions score best on `rows` (a boolean mask) by `metric`, the first of
    equals: what the predict stage keeps (all rows), and what each fold's cross-fitted choice is (the
    other folds' rows: the predict stage's honest score, and the ensemble's honest chain)."""
    score = task.bind(metric)
    chosen = None
    for p, probs in oof.items():
        s = score(probs[rows], y[rows])
        if chosen is None or is_better(metric, s, chosen[1]):
            chosen = (p, s)
    return chosen[0]
