"""The ensemblers: a registry of methods that combine the members' predictions, each following the
scikit-learn estimator contract, their cross-fitting (honest OOF), and a fitted one as numbers (what
submissions/ensemble.json and the bundle carry). The ensemble stage fits and chooses them; the
bundle's runtime rebuilds the chosen one."""

from __future__ import annotations

import copy
from typing import Callable

import numpy as np

from pipeline.errors import PipelineError
from pipeline.estimator_state import from_state, inline_get, inline_put, sklearn_types, to_state
from pipeline.metrics import argbest
from pipeline.tasks import DEFAULT_TASK, metric_function
from pipeline.tasks.single_label import vote_shares

ENSEMBLES: dict[str, type] = {}


def register_ensemble(name: str):
    """Class decorator: make an ensembler available as `ensemble.methods: [name]` in params.yaml."""

    def wrap(cls):
        cls.name = name
        ENSEMBLES[name] = cls
        return cls

    return wrap


class Ensemble:
    """The scikit-learn estimator contract for combining members' predictions (a single-label task's class
    probabilities (N, C) with class-index targets, or a multi-label task's per-label probabilities with
    multi-hot targets (N, C)).

    `__init__` only stores its arguments; `fit(probs_list, y)` learns from OOF predictions (one (N, C)
    array per member) and returns self; learned state ends in `_`; `predict_proba(probs_list)` combines
    new predictions of the same members. What a prediction means (its label) is the task's.
    """

    @classmethod
    def from_config(cls, metric: str, weights=None, task: str = DEFAULT_TASK, options=None) -> "Ensemble":
        """An unfitted instance from `ensemble.*` params and the task's name and options; a method that
        takes none of them ignores them."""
        return cls()

    weighted_mean = False  # True: predict_proba is the weights_-weighted mean of the members' probabilities

    def used_members(self) -> np.ndarray:
        """The members `predict_proba` depends on: all, or for a weighted mean those of non-zero weight."""
        return np.flatnonzero(self.weights_ > 0) if self.weighted_mean else np.arange(self.n_members_)

    def without_unused(self) -> "Ensemble":
        """The same fitted ensembler taking only its used members' probabilities (the same predictions)."""
        if not self.weighted_mean:
            return self
        keep = self.used_members()
        fitted = copy.copy(self)
        fitted.weights_, fitted.n_members_ = self.weights_[keep], len(keep)
        return fitted

    def fit(self, probs_list: list[np.ndarray], y: np.ndarray):
        probs = _stack(probs_list)
        y = np.asarray(y)
        if len(y) != probs.shape[1]:
            raise ValueError(f"y has {len(y)} rows, the probabilities {probs.shape[1]}")
        self.n_members_, self.n_classes_ = probs.shape[0], probs.shape[2]
        self.classes_ = np.arange(self.n_classes_)
        self._fit(probs, y)
        return self

    def predict_proba(self, probs_list: list[np.ndarray]) -> np.ndarray:
        if not hasattr(self, "n_members_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted yet: call fit() first")
        probs = _stack(probs_list)
        if probs.shape[0] != self.n_members_ or probs.shape[2] != self.n_classes_:
            raise ValueError(f"expected {self.n_members_} members with {self.n_classes_} classes, got {probs.shape}")
        return self._predict_proba(probs)

    def _fit(self, probs: np.ndarray, y: np.ndarray) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _predict_proba(self, probs: np.ndarray) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError


def _stack(probs_list) -> np.ndarray:
    if len(probs_list) == 0:
        raise ValueError("no member probabilities given")
    shapes = {np.shape(p) for p in probs_list}
    if len(shapes) != 1:
        raise ValueError(f"member probabilities differ in shape: {sorted(shapes)}")
    return np.stack(probs_list).astype(np.float64)


@register_ensemble("soft_voting")
class SoftVotingEnsemble(Ensemble):
    """Weighted mean of class probabilities with given weights (equal if None): sklearn's
    VotingClassifier(voting="soft"), `np.average(probs, axis=0, weights=weights_)`."""

    weighted_mean = True

    def __init__(self, weights=None):
        self.weights = weights

    @classmethod
    def from_config(cls, metric: str, weights=None, task: str = DEFAULT_TASK, options=None) -> "SoftVotingEnsemble":
        return cls(weights)

    def _fit(self, probs, y):
        weights = np.ones(len(probs)) if self.weights is None else np.asarray(self.weights, dtype=float)
        if weights.shape != (len(probs),) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(
                f"weights must be {len(probs)} non-negative numbers with a positive sum, got {self.weights}"
            )
        self.weights_ = weights / weights.sum()

    def _predict_proba(self, probs):
        return np.average(probs, axis=0, weights=self.weights_)


@register_ensemble("hard_voting")
class HardVotingEnsemble(Ensemble):
    """Majority vote of the members' predicted classes, ties broken by the mean probability.

    `predict_proba` is the vote share, with the mean probability mixed in at a weight too small to
    overturn a vote (votes + mean / 2, normalised): its argmax is the vote, and its log loss finite.
    """

    def __init__(self):
        pass

    def _fit(self, probs, y):
        self.weights_ = np.full(len(probs), 1 / len(probs))

    def _predict_proba(self, probs):
        return vote_shares(probs)


@register_ensemble("caruana")
class CaruanaEnsemble(Ensemble):
    """Greedy forward selection with replacement (Caruana et al., 2004): start from nothing, add the
    member whose addition gives the best `metric` of the running mean, `n_iter` times. A member
    picked k times weighs k / n_iter; a copy of a member adds nothing that member does not."""

    weighted_mean = True

    def __init__(self, metric: str = "log_loss", n_iter: int = 50, task: str = DEFAULT_TASK, options=None):
        self.metric = metric
        self.n_iter = n_iter
        self.task = task  # whose `metric` scores the running mean
        self.options = options  # the task's (f_beta's beta)

    @classmethod
    def from_config(cls, metric: str, weights=None, task: str = DEFAULT_TASK, options=None) -> "CaruanaEnsemble":
        return cls(metric=metric, task=task, options=options)

    def _fit(self, probs, y):
        score = metric_function(self.task, self.metric, self.options)
        counts = np.zeros(len(probs))
        total = np.zeros_like(probs[0])
        self.scores_ = []
        for it in range(self.n_iter):
            trial = [score((total + p) / (it + 1), y) for p in probs]
            best = argbest(self.metric, trial)
            counts[best] += 1
            total += probs[best]
            self.scores_.append(trial[best])
        self.weights_ = counts / counts.sum()

    def _predict_proba(self, probs):
        return np.tensordot(self.weights_, probs, axes=1)


@register_ensemble("optimized")
class OptimizedWeightsEnsemble(Ensemble):
    """Weights >= 0 summing to 1 that minimise the OOF log loss of the weighted mean (SLSQP from
    equal weights; multi-hot targets: the mean binary cross-entropy; a regression: the mean squared
    error). Both are smooth in the weights; for accuracy or F1 use `caruana`."""

    weighted_mean = True

    def __init__(self, maxiter: int = 200, regression: bool = False):
        self.maxiter = maxiter
        self.regression = regression

    @classmethod
    def from_config(cls, metric: str, weights=None, task: str = DEFAULT_TASK, options=None):
        return cls(regression=task == "regression")

    def _fit(self, probs, y):
        from scipy.optimize import minimize

        if self.regression:
            pred, target = probs.reshape(len(probs), -1), np.ravel(y)

            def loss(w):
                return np.mean((w @ pred - target) ** 2)

            def grad(w):
                return 2 * pred @ (w @ pred - target) / len(target)

        else:
            if y.ndim == 2:  # multi-hot: each (row, label) is a binary outcome; p of what happened
                true = np.where(y[None] > 0, probs, 1 - probs).reshape(len(probs), -1)
            else:
                true = probs[:, np.arange(len(y)), y]  # (members, N): p of the true class
            true = np.clip(true, 1e-15, 1.0)

            def loss(w):
                return -np.log(np.clip(w @ true, 1e-15, None)).mean()

            def grad(w):
                return -(true / np.clip(w @ true, 1e-15, None)).mean(1)

        m = len(probs)
        result = minimize(
            loss,
            np.full(m, 1 / m),
            jac=grad,
            method="SLSQP",
            bounds=[(0, 1)] * m,
            constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1, "jac": lambda w: np.ones(m)}],
            options={"maxiter": self.maxiter},
        )
        w = np.clip(result.x, 0, None)
        self.weights_ = w / w.sum()

    def _predict_proba(self, probs):
        return np.tensordot(self.weights_, probs, axes=1)


@register_ensemble("rank_average")
class RankAveragingEnsemble(Ensemble):
    """Per class, each member's probabilities replaced by their rank among the rows (0..1), averaged
    over members, normalised per row (multi-label: not normalised, each label stands alone). Robust to
    members with different calibration; ranks are taken within the rows given, so test rows are ranked
    among the test rows."""

    def __init__(self):
        pass

    def _fit(self, probs, y):
        self.weights_ = np.full(len(probs), 1 / len(probs))
        self.normalise_ = np.ndim(y) == 1

    def _predict_proba(self, probs):
        from scipy.stats import rankdata

        n = probs.shape[1]
        ranks = rankdata(probs, axis=1) / n  # (members, N, C), ranks over rows per class
        mean = ranks.mean(0)
        return mean / mean.sum(1, keepdims=True) if getattr(self, "normalise_", True) else mean


@register_ensemble("stacking")
class StackingEnsemble(Ensemble):
    """Logistic regression on the members' log-probabilities side by side (a meta-model); multi-hot
    targets: one per label, on the members' logits of that label; a regression: a ridge on the members'
    predictions (its output clipped to the targets' range it was fitted on). Its score is only honest when
    fitted and scored on different rows: `cross_fit` does that."""

    def __init__(self, C: float = 1.0, regression: bool = False):
        self.C = C
        self.regression = regression

    @classmethod
    def from_config(cls, metric: str, weights=None, task: str = DEFAULT_TASK, options=None):
        return cls(regression=task == "regression")

    def _fit(self, probs, y):
        from sklearn.linear_model import LogisticRegression, Ridge

        if self.regression:
            self.range_ = [float(np.min(y)), float(np.max(y))]
            self.model_ = Ridge(alpha=1.0 / self.C).fit(probs[:, :, 0].T, np.ravel(y))
            return
        if y.ndim == 2:
            if (y.min(0) == y.max(0)).any():
                raise ValueError("stacking needs both values of every label among the rows it is fitted on")
            logits = self._logits(probs)
            self.models_ = [
                LogisticRegression(C=self.C, max_iter=1000).fit(logits[:, :, c], y[:, c]) for c in range(y.shape[1])
            ]
            return
        self.model_ = LogisticRegression(C=self.C, max_iter=1000).fit(self._features(probs), y)
        if len(self.model_.classes_) != self.n_classes_:
            raise ValueError("stacking needs every class among the rows it is fitted on")

    def _predict_proba(self, probs):
        if self.regression:
            return np.clip(self.model_.predict(probs[:, :, 0].T), *self.range_).reshape(-1, 1)
        if hasattr(self, "models_"):
            logits = self._logits(probs)
            return np.stack([m.predict_proba(logits[:, :, c])[:, 1] for c, m in enumerate(self.models_)], axis=1)
        return self.model_.predict_proba(self._features(probs))

    @staticmethod
    def _logits(probs):
        p = np.clip(probs, 1e-7, 1 - 1e-7)
        return (np.log(p) - np.log1p(-p)).transpose(1, 0, 2)  # (N, members, C)

    @staticmethod
    def _features(probs):
        return np.log(np.clip(probs, 1e-7, 1.0)).transpose(1, 0, 2).reshape(probs.shape[1], -1)


def create_ensemble(name: str, metric: str, weights=None, task: str = DEFAULT_TASK, options=None) -> Ensemble:
    """An unfitted ensembler by registry name, for `task`'s predictions (and the task's options)."""
    if name not in ENSEMBLES:
        raise ValueError(f"unknown ensemble method '{name}' (choose from {sorted(ENSEMBLES)})")
    return ENSEMBLES[name].from_config(metric, weights, task, options)


def _state_types() -> dict[str, type]:
    return {**{cls.__name__: cls for cls in ENSEMBLES.values()}, **sklearn_types()}


def ensemble_state(model: Ensemble) -> dict:
    """A fitted ensembler as numbers (pipeline/estimator_state.py): its weights, or the stacking
    meta-model's coefficients and intercepts; what submissions/ensemble.json and the bundle carry."""
    return to_state(model, _state_types(), inline_put, model.name)


def ensemble_from_state(state: dict, where: str) -> Ensemble:
    """The fitted ensembler `ensemble_state` wrote; only this module's and scikit-learn's classes are built."""
    model = from_state(state, _state_types(), inline_get, where)
    if not isinstance(model, Ensemble):
        raise PipelineError(f"{where}: not an ensemble method's state")
    return model


def cross_fit(
    make: Callable[[], Ensemble], probs_list: list[np.ndarray], y: np.ndarray, folds: np.ndarray
) -> np.ndarray:
    """Honest OOF probabilities of an ensembler: for each fold k, fit a fresh one on the other folds'
    OOF rows and predict fold k's rows. Scoring these is not optimistic, as scoring a fit on all
    rows would be."""
    probs = _stack(probs_list)
    out = np.zeros(probs.shape[1:])
    for k in np.unique(folds):
        held = folds == k
        model = make().fit(list(probs[:, ~held]), y[~held])
        out[held] = model.predict_proba(list(probs[:, held]))
    return out
