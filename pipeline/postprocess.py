"""The fitted last step of the chain: what turns the ensemble's blended probabilities into the submission's,
fitted on OOF rows only, then chosen and scored by cross-fitting.

    identity       nothing fitted
    temperature    one temperature t (log-loss competitions): log-probabilities / t (single-label, softmax
                   again) or logits / t (multi-label), t minimising the OOF log loss
    thresholds     multi-label decisions for F1 / F-beta: one global threshold, or one per label (coordinate
                   ascent from the global one), optionally with "at least one label per image" (an image
                   where no label passes gets its most likely one, relative to its threshold)
    cuts           a graded regression scored by quadratic weighted kappa: the cut points between grades
                   (coordinate ascent from the half-way points, each cut among the midpoints between
                   neighbouring predictions), the predictions mapped so that each cut lands half-way

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


def _kappa_of_grades(pred: np.ndarray, true: np.ndarray, k: int) -> float:
    """Quadratic weighted kappa of grade indices (as scikit-learn's cohen_kappa_score, weights="quadratic"),
    from counts: the cut search scores thousands of candidates."""
    observed = np.bincount(true * k + pred, minlength=k * k).reshape(k, k).astype(np.float64)
    expected = np.outer(observed.sum(1), observed.sum(0)) / max(observed.sum(), 1)
    g = np.arange(k)
    weights = (g[:, None] - g[None, :]) ** 2
    den = (weights * expected).sum()
    return float(1 - (weights * observed).sum() / den) if den > 0 else 1.0


class Cuts(Step):
    name = "cuts"
    MAX_CANDIDATES = 256  # per cut and pass: midpoints between neighbouring predictions, evenly by rank

    def __init__(self, task, cuts=None):
        self.task, self.cuts = task, cuts

    def fit(self, pred, y):
        grades = np.asarray(self.task.grades, dtype=np.float64)
        k, x = len(grades), np.ravel(pred).astype(np.float64)
        true = np.searchsorted((grades[1:] + grades[:-1]) / 2, np.ravel(y), side="right")
        cuts = (grades[1:] + grades[:-1]) / 2
        values = np.unique(x)
        between = (values[1:] + values[:-1]) / 2  # every distinct way to split the rows
        for _ in range(3):
            for i in range(k - 1):
                lo = cuts[i - 1] if i > 0 else -np.inf
                hi = cuts[i + 1] if i < k - 2 else np.inf
                options = between[(between > lo) & (between < hi)]
                if len(options) > self.MAX_CANDIDATES:
                    options = options[np.linspace(0, len(options) - 1, self.MAX_CANDIDATES).round().astype(int)]
                if not len(options):
                    continue
                scores = []
                for c in options:
                    trial = cuts.copy()
                    trial[i] = c
                    scores.append(_kappa_of_grades(np.searchsorted(trial, x, side="right"), true, k))
                current = _kappa_of_grades(np.searchsorted(cuts, x, side="right"), true, k)
                best = int(np.argmax(scores))
                if scores[best] > current:
                    cuts[i] = options[best]
        self.cuts = cuts.tolist()
        return self

    def transform(self, pred):
        grades = np.asarray(self.task.grades, dtype=np.float64)
        mids, cuts = (grades[1:] + grades[:-1]) / 2, np.asarray(self.cuts)
        x = np.asarray(pred, dtype=np.float64)
        inside = np.interp(x, cuts, mids) if len(cuts) > 1 else x - cuts[0] + mids[0]
        return np.where(x < cuts[0], x - cuts[0] + mids[0], np.where(x > cuts[-1], x - cuts[-1] + mids[-1], inside))

    def state(self):
        return {"step": self.name, "cuts": self.cuts, "grades": self.task.grades}


def create_step(name: str, task, metric: str) -> Step:
    """A candidate by the name the task lists: identity, temperature, thresholds[_per_label][+one]."""
    if name == "identity":
        return Step()
    if name == "temperature":
        return Temperature(task)
    if name == "cuts":
        return Cuts(task)
    base, _, one = name.partition("+")
    return Thresholds(task, metric, per_label=base == "thresholds_per_label", at_least_one=one == "one")


def step_from_state(state: dict, task) -> Step:
    """The fitted step `Step.state` wrote (submissions/ensemble.json, the bundle)."""
    if state["step"] == "temperature":
        return Temperature(task, float(state["temperature"]))
    if state["step"] == "cuts":
        return Cuts(task, [float(c) for c in state["cuts"]])
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
