"""Scores computed the same way for folds, OOF, ensembles and the local leaderboard."""
from __future__ import annotations

import numpy as np


def accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    return float((probs.argmax(1) == y).mean())


def log_loss(probs: np.ndarray, y: np.ndarray, eps: float = 1e-15) -> float:
    """Mean negative log-probability of the true class (clipped like sklearn's log_loss)."""
    p = np.clip(probs[np.arange(len(y)), y], eps, 1.0)
    return float(-np.log(p).mean())


def scores(probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return {"accuracy": accuracy(probs, y), "log_loss": log_loss(probs, y)}
