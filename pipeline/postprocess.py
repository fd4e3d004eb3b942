"""The fitted last step of the chain: what turns the ensemble's blended probabilities into the submission's,
fitted on OOF rows only, then chosen and scored by cross-fitting.

    identity       nothing fitted
    temperature    one temperature t (log-loss competitions): log-probabilities / t (single-label, softmax
                   again) or logits / t (multi-label), t minimising the OOF log loss
    thresholds     multi-label decisions for F1 / F-beta: one global threshold, or one per label (coordinate
                   ascent from the global one), optionally with "at least one label per image" (an image
                   where no label passes gets its most likely one, relative to its threshold)

Thresholds keep predictions as probabilities: each label's probabilities are rescaled piecewise-linearly so
that its threshold lands on 0.5 (monotone: each label's ranks, hence its AUC, are unchanged). The task's
candidates (`Task.postprocess_candidates`) depend on the metric; `choose_step` picks one by its cross-fitted score.
"""

from __future__ import annotations

import numpy as np

from pipeline.metrics import is_better
from pipeline.tasks.multilabel import rescale

GRID = np.round(np.arange(0.02, 0.99, 0.02), 2)  # candidate thresholds


class Step:
    """fit(probs, y) -> self on OOF rows; transform(probs) -> probs; state() -> JSON numbers."""

    name = "identity"

    def fit(self, probs: np.ndarray, y: np.ndarray) -> "Step":
        return self

    def transform(self, probs: np.ndarray) -> np.ndarray:
        return probs

    def state(self) -> dict:
        return {"step": self.name}


class Temperature(Step):
    name = "temperature"

    def __init__(self, task, t: float = 1.0):
        self.task, self.t = task, t

    def fit(self, probs, y):
        from scipy.optimize import minimize_scalar

        loss = self.task.bind("log_loss")
        found = minimize_scalar(
            lambda log_t: loss(self.task.temperature(probs, float(np.exp(log_t))), y),
            bounds=(-3.0, 3.0),
            method="bounded",
        )
        self.t = float(np.exp(found.x))
        return self

    def transform(self, probs):
        return self.task.temperature(probs, self.t)

    def state(self):
        return {"step": self.name, "temperature": self.t}


def _f_scores(metric: str, beta: float, tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """The decision metric from per-image counts (..., N): F-beta over images (an image with nothing true
    and nothing predicted scores 1, as scikit-learn's zero_division=1) or micro F1 of the pooled counts."""
    if metric == "f_beta":
        b2 = beta * beta
        den = (1 + b2) * tp + b2 * fn + fp
        return np.where(den > 0, (1 + b2) * tp / np.maximum(den, 1), 1.0).mean(-1)
    TP, FP, FN = tp.sum(-1), fp.sum(-1), fn.sum(-1)
    return 2 * TP / np.maximum(2 * TP + FP + FN, 1)


def decision_score(metric: str, beta: float, decided: np.ndarray, y: np.ndarray) -> float:
    """f_beta, micro_f1 or macro_f1 of 0/1 decisions (N, C) against multi-hot `y`, from counts (fast: the
    threshold search scores thousands of candidates; equal to scikit-learn's, tests/test_postprocess.py)."""
    d, t = decided.astype(bool), y > 0
    if metric == "macro_f1":
        tp, fp, fn = (d & t).sum(0), (d & ~t).sum(0), (~d & t).sum(0)
        return float((2 * tp / np.maximum(2 * tp + fp + fn, 1)).mean())
    return float(_f_scores(metric, beta, (d & t).sum(1), (d & ~t).sum(1), (~d & t).sum(1)))


def _label_scores(metric: str, beta: float, decided: np.ndarray, y: np.ndarray, c: int, grid_dec: np.ndarray):
    """The metric for each candidate decision column `grid_dec` (G, N) of label c, the others as `decided`
    (for macro F1, label c's own F1: the other labels' do not change)."""
    yc = y[:, c][None]
    tp_c, fp_c, fn_c = grid_dec & yc, grid_dec & ~yc, ~grid_dec & yc  # (G, N)
    if metric == "macro_f1":
        tp, fp, fn = tp_c.sum(1), fp_c.sum(1), fn_c.sum(1)
        return 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    d, t = np.delete(decided, c, axis=1), np.delete(y, c, axis=1)
    tp, fp, fn = (d & t).sum(1), (d & ~t).sum(1), (~d & t).sum(1)  # (N,) per image, without label c
    return _f_scores(metric, beta, tp + tp_c, fp + fp_c, fn + fn_c)


class Thresholds(Step):
    name = "thresholds"

    def __init__(self, task, metric: str, per_label: bool, at_least_one: bool, thresholds=None):
        self.task, self.metric, self.per_label, self.at_least_one = task, metric, per_label, at_least_one
        self.thresholds = thresholds

    def fit(self, probs, y):
        yb, beta = y > 0, getattr(self.task, "beta", 1.0)
        scores = [decision_score(self.metric, beta, rescale(probs, t, self.at_least_one) >= 0.5, yb) for t in GRID]
        best = GRID[int(np.argmax(scores))]
        t = np.full(probs.shape[1], best)
        if self.per_label:
            for _ in range(2):  # coordinate ascent: each label's threshold with the others fixed
                for c in range(probs.shape[1]):
                    decided = probs >= t
                    grid_dec = probs[:, c][None] >= GRID[:, None]
                    t[c] = GRID[int(np.argmax(_label_scores(self.metric, beta, decided, yb, c, grid_dec)))]
        self.thresholds = t.tolist()
        return self

    def transform(self, probs):
        return rescale(probs, np.asarray(self.thresholds), self.at_least_one)

    def state(self):
        return {
            "step": self.name,
            "metric": self.metric,
            "per_label": self.per_label,
            "at_least_one": self.at_least_one,
            "thresholds": dict(zip(self.task.classes, self.thresholds)) if self.task.classes else self.thresholds,
        }


def create_step(name: str, task, metric: str) -> Step:
    """A candidate by the name the task lists: identity, temperature, thresholds[_per_label][+one]."""
    if name == "identity":
        return Step()
    if name == "temperature":
        return Temperature(task)
    base, _, one = name.partition("+")
    return Thresholds(task, metric, per_label=base == "thresholds_per_label", at_least_one=one == "one")


def step_from_state(state: dict, task) -> Step:
    """The fitted step `Step.state` wrote (submissions/ensemble.json, the bundle)."""
    if state["step"] == "temperature":
        return Temperature(task, float(state["temperature"]))
    if state["step"] == "thresholds":
        t = state["thresholds"]
        values = [t[c] for c in task.classes] if isinstance(t, dict) else t
        return Thresholds(task, state["metric"], state["per_label"], state["at_least_one"], values)
    return Step()


def cross_fit_step(make, probs: np.ndarray, y: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Honest post-processed probabilities: each fold's rows by a step fitted on the other folds."""
    out = np.zeros_like(probs)
    for k in np.unique(folds):
        held = folds == k
        out[held] = make().fit(probs[~held], y[~held]).transform(probs[held])
    return out


def choose_step(
    task, metric: str, probs: np.ndarray, y: np.ndarray, folds: np.ndarray
) -> tuple[Step, dict, np.ndarray]:
    """The task's candidate with the best cross-fitted `metric` on these OOF rows (identity first, so it
    wins ties), fitted on all of them; each candidate's cross-fitted score; and the chosen one's
    cross-fitted probabilities (identity alone: `probs` as they are)."""
    names = task.postprocess_candidates(metric)
    if names == ["identity"]:
        return Step(), {}, probs
    score = task.bind(metric)
    honest, scores = {}, {}
    for name in names:
        honest[name] = cross_fit_step(lambda n=name: create_step(n, task, metric), probs, y, folds)
        scores[name] = score(honest[name], y)
    chosen = names[0]
    for name in names[1:]:
        if is_better(metric, scores[name], scores[chosen]):
            chosen = name
    return create_step(chosen, task, metric).fit(probs, y), scores, honest[chosen]
