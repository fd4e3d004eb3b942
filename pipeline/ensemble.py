"""`ensemble` stage: ensembles of the backbones fitted on OOF probabilities, honest scores, submissions.

    python -m pipeline ensemble    # writes submissions/, reports/ensemble.json, reports/metrics.json

Every method is fitted on OOF probabilities only (never on test predictions or answers) and scored
by cross-fitting over the CV folds, so the score that picks the final method is not optimistic.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from pipeline.config import ConfigError, Params
from pipeline.data import PreparedData
from pipeline.errors import PipelineError
from pipeline.estimator_state import from_state, inline_get, inline_put, sklearn_types, to_state
from pipeline.io import atomic_dir, atomic_write_text, read_json, write_json
from pipeline.metrics import METRICS, argbest, is_better, scores
from pipeline.probs import probs_frame, read_probs
from pipeline.submission import SubmissionFormat, build_submission, local_leaderboard, validate_submission

ENSEMBLES: dict[str, type] = {}


def register_ensemble(name: str):
    """Class decorator: make an ensembler available as `ensemble.methods: [name]` in params.yaml."""

    def wrap(cls):
        cls.name = name
        ENSEMBLES[name] = cls
        return cls

    return wrap


class _Ensemble:
    """The scikit-learn estimator contract for combining members' class probabilities.

    `__init__` only stores its arguments; `fit(probs_list, y)` learns from OOF probabilities (one
    (N, C) array per member) and returns self; learned state ends in `_`; `predict_proba(probs_list)`
    combines new probabilities of the same members; `predict` is its argmax.
    """

    @classmethod
    def from_config(cls, metric: str, weights=None) -> "_Ensemble":
        """An unfitted instance from `ensemble.*` params; a method that takes neither ignores them."""
        return cls()

    weighted_mean = False  # True: predict_proba is the weights_-weighted mean of the members' probabilities

    def used_members(self) -> np.ndarray:
        """The members `predict_proba` depends on: all, or for a weighted mean those of non-zero weight."""
        return np.flatnonzero(self.weights_ > 0) if self.weighted_mean else np.arange(self.n_members_)

    def without_unused(self) -> "_Ensemble":
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

    def predict(self, probs_list: list[np.ndarray]) -> np.ndarray:
        return self.predict_proba(probs_list).argmax(1)

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
class SoftVotingEnsemble(_Ensemble):
    """Weighted mean of class probabilities with given weights (equal if None): sklearn's
    VotingClassifier(voting="soft"), `np.average(probs, axis=0, weights=weights_)`."""

    weighted_mean = True

    def __init__(self, weights=None):
        self.weights = weights

    @classmethod
    def from_config(cls, metric: str, weights=None) -> "SoftVotingEnsemble":
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
class HardVotingEnsemble(_Ensemble):
    """Majority vote of the members' predicted classes, ties broken by the mean probability.

    `predict_proba` is the vote share, with the mean probability mixed in at a weight too small to
    overturn a vote (votes + mean / 2, normalised): its argmax is the vote, and its log loss finite.
    """

    def __init__(self):
        pass

    def _fit(self, probs, y):
        self.weights_ = np.full(len(probs), 1 / len(probs))

    def _predict_proba(self, probs):
        m, n, c = probs.shape
        votes = np.zeros((n, c))
        for member in probs:
            votes[np.arange(n), member.argmax(1)] += 1
        return (votes + probs.mean(0) / 2) / (m + 0.5)


@register_ensemble("caruana")
class CaruanaEnsemble(_Ensemble):
    """Greedy forward selection with replacement (Caruana et al., 2004): start from nothing, add the
    member whose addition gives the best `metric` of the running mean, `n_iter` times. A member
    picked k times weighs k / n_iter; a copy of a member adds nothing that member does not."""

    weighted_mean = True

    def __init__(self, metric: str = "log_loss", n_iter: int = 50):
        self.metric = metric
        self.n_iter = n_iter

    @classmethod
    def from_config(cls, metric: str, weights=None) -> "CaruanaEnsemble":
        return cls(metric=metric)

    def _fit(self, probs, y):
        score, _ = _metric(self.metric)
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
class OptimizedWeightsEnsemble(_Ensemble):
    """Weights >= 0 summing to 1 that minimise the OOF log loss of the weighted mean (SLSQP from
    equal weights). Log loss is smooth in the weights; for accuracy or F1 use `caruana`."""

    weighted_mean = True

    def __init__(self, maxiter: int = 200):
        self.maxiter = maxiter

    def _fit(self, probs, y):
        from scipy.optimize import minimize

        true = np.clip(probs[:, np.arange(len(y)), y], 1e-15, 1.0)  # (members, N): p of the true class

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
class RankAveragingEnsemble(_Ensemble):
    """Per class, each member's probabilities replaced by their rank among the rows (0..1), averaged
    over members, normalised per row. Robust to members with different calibration; ranks are taken
    within the rows given, so test rows are ranked among the test rows."""

    def __init__(self):
        pass

    def _fit(self, probs, y):
        self.weights_ = np.full(len(probs), 1 / len(probs))

    def _predict_proba(self, probs):
        from scipy.stats import rankdata

        n = probs.shape[1]
        ranks = rankdata(probs, axis=1) / n  # (members, N, C), ranks over rows per class
        mean = ranks.mean(0)
        return mean / mean.sum(1, keepdims=True)


@register_ensemble("stacking")
class StackingEnsemble(_Ensemble):
    """Logistic regression on the members' log-probabilities side by side (a meta-model). Its score
    is only honest when fitted and scored on different rows: `cross_fit` does that."""

    def __init__(self, C: float = 1.0):
        self.C = C

    def _fit(self, probs, y):
        from sklearn.linear_model import LogisticRegression

        self.model_ = LogisticRegression(C=self.C, max_iter=1000).fit(self._features(probs), y)
        if len(self.model_.classes_) != self.n_classes_:
            raise ValueError("stacking needs every class among the rows it is fitted on")

    def _predict_proba(self, probs):
        return self.model_.predict_proba(self._features(probs))

    @staticmethod
    def _features(probs):
        return np.log(np.clip(probs, 1e-7, 1.0)).transpose(1, 0, 2).reshape(probs.shape[1], -1)


def _metric(name: str):
    if name not in METRICS:
        raise ValueError(f"unknown metric '{name}' (choose from {sorted(METRICS)})")
    return METRICS[name]


def create_ensemble(name: str, metric: str, weights=None) -> _Ensemble:
    """An unfitted ensembler by registry name."""
    if name not in ENSEMBLES:
        raise ValueError(f"unknown ensemble method '{name}' (choose from {sorted(ENSEMBLES)})")
    return ENSEMBLES[name].from_config(metric, weights)


def _state_types() -> dict[str, type]:
    return {**{cls.__name__: cls for cls in ENSEMBLES.values()}, **sklearn_types()}


def ensemble_state(model: _Ensemble) -> dict:
    """A fitted ensembler as numbers (pipeline/estimator_state.py): its weights, or the stacking
    meta-model's coefficients and intercepts; what submissions/ensemble.json and the bundle carry."""
    return to_state(model, _state_types(), inline_put, model.name)


def ensemble_from_state(state: dict, where: str) -> _Ensemble:
    """The fitted ensembler `ensemble_state` wrote; only this module's and scikit-learn's classes are built."""
    model = from_state(state, _state_types(), inline_get, where)
    if not isinstance(model, _Ensemble):
        raise PipelineError(f"{where}: not an ensemble method's state")
    return model


def cross_fit(
    make: Callable[[], _Ensemble], probs_list: list[np.ndarray], y: np.ndarray, folds: np.ndarray
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


@dataclass
class MethodFit:
    """One method of the ensemble stage: fitted on all OOF rows (for test), and cross-fitted (its
    honest OOF, which scores it and picks the submission)."""

    model: _Ensemble
    honest_oof: np.ndarray
    test: np.ndarray
    report: dict = field(default_factory=dict)  # oof (honest), oof_in_sample, weights per backbone


def fit_methods(
    names: list[str],
    metric: str,
    weights: list[float],
    backbones: list[str],
    oof: list[np.ndarray],
    test: list[np.ndarray],
    y: np.ndarray,
    folds: np.ndarray,
) -> tuple[dict[str, MethodFit], dict[str, str]]:
    """Fit and cross-fit each method of `names` on the backbones' OOF probabilities. Returns the
    fitted methods and, for those that could not be fitted (e.g. stacking on a fold lacking a class),
    their reason."""
    fits, errors = {}, {}
    for name in names:

        def make(name=name):
            return create_ensemble(name, metric, weights)

        try:
            model = make().fit(oof, y)
            honest = cross_fit(make, oof, y, folds)
        except ValueError as exc:
            errors[name] = str(exc)
            continue
        report = {"oof": scores(honest, y, METRICS), "oof_in_sample": scores(model.predict_proba(oof), y, METRICS)}
        if hasattr(model, "weights_"):
            report["weights"] = dict(zip(backbones, np.round(model.weights_, 6).tolist()))
        fits[name] = MethodFit(model, honest, model.predict_proba(test), report)
    return fits, errors


def choose_method(fits: dict[str, MethodFit], method: str, metric: str) -> str:
    """`method` itself, or for "auto" the fitted method with the best honest OOF `metric` (the first of
    equals, in `ensemble.methods` order)."""
    if method != "auto":
        return method
    chosen = None
    for name, fit in fits.items():
        if chosen is None or is_better(metric, fit.report["oof"][metric], fits[chosen].report["oof"][metric]):
            chosen = name
    return chosen


# ---------------------------------------------------------------- the stage


def headline(metrics: dict, metric: str, chosen_by: str) -> dict:
    """The few numbers that tell runs apart, flat, for `dvc metrics show` and `dvc exp show` at 120
    columns: the submission's method and honest OOF score (the competition's `metric`, the one the
    method was `chosen_by`, and log loss) and its local leaderboard score if the competition has
    answers. Each backbone's scores, each method's, the TTA choices: reports/ensemble.json."""
    out = {
        "method": metrics["method"],
        **{m: round(metrics["oof"][m], 5) for m in dict.fromkeys([metric, chosen_by, "log_loss"])},
    }
    if "holdout" in metrics:
        out[f"holdout_{metric}"] = round(metrics["holdout"][metric], 5)
    if metric in metrics.get("local_leaderboard", {}):
        out[f"lb_{metric}"] = round(metrics["local_leaderboard"][metric], 5)
    return out


def single_report(backbone: str, oof: np.ndarray, y: np.ndarray) -> dict:
    """One backbone's OOF scores beside its predict stage's TTA choice, for the report."""
    path = Path(f"predictions/{backbone}/tta.json")
    tta = read_json(path) if path.exists() else {}
    return {
        "oof": scores(oof, y, METRICS),
        "tta": tta.get("policy"),
        "oof_no_tta": tta.get("policies", {}).get("none"),
        "oof_tta_selection_crossfit": tta.get("oof_selection_crossfit"),
        "seeds": tta.get("seeds"),
    }


def score_holdout(fitted: dict[str, MethodFit], singles: dict[str, dict], data: PreparedData) -> None:
    """`cv.holdout`: every fitted method and backbone scored on the held-out rows, each backbone's bag
    of fold models under its chosen TTA (as the test set is predicted); the scores choose nothing."""
    ids, y = data.holdout["id"], data.holdout["target"].to_numpy()
    held = [read_probs(f"predictions/{b}/holdout_probs.csv", ids, data.classes, b) for b in singles]
    for fit in fitted.values():
        fit.report["holdout"] = scores(fit.model.predict_proba(held), y, METRICS)
    for b, probs in zip(singles, held):
        singles[b]["holdout"] = scores(probs, y, METRICS)


@dataclass
class EnsembleRun:
    """What the ensemble stage decided: every fitted method, the chosen one, and the report."""

    fitted: dict[str, MethodFit]
    chosen: str
    metrics: dict  # reports/ensemble.json


def fit_stage(params: Params, data: PreparedData, where: str) -> EnsembleRun:
    """Fit and cross-fit every method of `ensemble.methods` on the backbones' OOF probabilities in
    predictions/, choose one (`ensemble.method`), and report it beside the best single backbone."""
    cfg, backbones, y = params.ensemble, list(params.train.backbones), data.targets
    bad = [m for m in cfg.methods if m not in ENSEMBLES]  # the registry's names; the rest was checked on reading
    if bad:
        raise ConfigError(f"{where}: ensemble.methods: unknown method '{bad[0]}' (known: {', '.join(ENSEMBLES)})")
    oof = [read_probs(f"predictions/{b}/oof_probs.csv", data.train["id"], data.classes, b) for b in backbones]
    test = [read_probs(f"predictions/{b}/test_probs.csv", data.test["id"].tolist(), data.classes, b) for b in backbones]
    fitted, errors = fit_methods(
        cfg.methods, cfg.metric, [cfg.weights.get(b, 1.0) for b in backbones], backbones, oof, test, y, data.folds
    )
    for name, reason in errors.items():
        print(f"ensemble method {name} skipped: {reason}")
    if not fitted:
        raise ConfigError(f"{where}: ensemble.methods: no method could be fitted")
    if cfg.method in errors:
        raise ConfigError(f"{where}: ensemble.method: {cfg.method} could not be fitted ({errors[cfg.method]})")
    chosen = choose_method(fitted, cfg.method, cfg.metric)
    methods = {name: fitted[name].report if name in fitted else {"error": errors[name]} for name in cfg.methods}
    singles = {b: single_report(b, probs, y) for b, probs in zip(backbones, oof)}
    if data.holdout is not None:
        score_holdout(fitted, singles, data)
    best_single = backbones[argbest(cfg.metric, [singles[b]["oof"][cfg.metric] for b in backbones])]
    final = methods[chosen]["oof"]
    return EnsembleRun(
        fitted,
        chosen,
        {
            "method": chosen,
            "metric": cfg.metric,
            "oof": final,
            **({"holdout": methods[chosen]["holdout"]} if data.holdout is not None else {}),
            "best_single": {"backbone": best_single, **singles[best_single]["oof"]},
            "gain_over_best_single": {m: final[m] - singles[best_single]["oof"][m] for m in final},
            "methods": methods,
            "members": backbones,  # the order of the members' probabilities every method was fitted on
            "backbones": singles,
        },
    )


def write_submissions(run: EnsembleRun, data: PreparedData, prepared: Path, out: Path) -> None:
    """`out`/methods/<method>-oof-<metric>-<score>.csv for every fitted method (each checked against the
    sample submission, each scored on the local leaderboard where the competition has answers: reported,
    never used to choose), then the chosen method's submission.csv and its OOF and test probabilities."""
    metric, methods = run.metrics["metric"], run.metrics["methods"]
    test_ids = data.test["id"].tolist()
    sample = pd.read_csv(prepared / "sample_submission.csv", dtype=str, keep_default_na=False)
    fmt = SubmissionFormat(**read_json(prepared / "submission_format.json"))
    answers = prepared / "answers.csv"
    with atomic_dir(out / "methods") as folder:
        for name, fit in run.fitted.items():
            submission = build_submission(test_ids, fit.test, data.classes, fmt)
            validate_submission(submission, sample, data.classes, fmt)
            file = f"{name}-oof-{metric}-{methods[name]['oof'][metric]:.4f}.csv"
            submission.to_csv(folder / file, index=False)
            methods[name]["submission"] = f"{out}/methods/{file}"
            if answers.exists():
                methods[name]["local_leaderboard"] = local_leaderboard(
                    pd.read_csv(answers, dtype=str, keep_default_na=False), test_ids, fit.test, data.classes
                )
    chosen = run.fitted[run.chosen]
    write_json(
        out / "ensemble.json",
        {
            "method": run.chosen,
            "members": run.metrics["members"],
            "classes": data.classes,
            "states": {name: ensemble_state(fit.model) for name, fit in run.fitted.items()},
        },
    )
    atomic_write_text(
        out / "oof_probs.csv", probs_frame(data.train["id"], chosen.honest_oof, data.classes).to_csv(index=False)
    )
    atomic_write_text(out / "test_probs.csv", probs_frame(test_ids, chosen.test, data.classes).to_csv(index=False))
    atomic_write_text(
        out / "submission.csv", build_submission(test_ids, chosen.test, data.classes, fmt).to_csv(index=False)
    )
    if "local_leaderboard" in methods[run.chosen]:
        run.metrics["local_leaderboard"] = methods[run.chosen]["local_leaderboard"]


def log_stage(run: EnsembleRun, tracker, submissions: Path, report: str) -> None:
    """The ensemble's MLflow run: the chosen method's scores and files, a nested run per method."""
    metrics, methods = run.metrics, run.metrics["methods"]
    weights = lambda name: {f"weight_{b}": w for b, w in methods[name].get("weights", {}).items()}  # noqa: E731
    with tracker.run(
        "ensemble",
        params={"method": run.chosen, "metric": metrics["metric"], "methods": ",".join(methods), **weights(run.chosen)},
        tags={"stage": "ensemble"},
    ):
        tracker.log_metrics({f"oof_{m}": v for m, v in metrics["oof"].items()})
        tracker.log_metrics({f"gain_{m}": v for m, v in metrics["gain_over_best_single"].items()})
        tracker.log_metrics({f"holdout_{m}": v for m, v in metrics.get("holdout", {}).items()})
        if "local_leaderboard" in metrics:
            tracker.log_metrics({f"local_leaderboard_{m}": v for m, v in metrics["local_leaderboard"].items()})
        for path in (submissions / "submission.csv", submissions / "oof_probs.csv", report):
            tracker.log_artifact(str(path))
        tracker.log_candidates(
            {
                name: (
                    {"method": name, **weights(name)},
                    {
                        **{f"oof_{m}": v for m, v in methods[name]["oof"].items()},
                        **{f"holdout_{m}": v for m, v in methods[name].get("holdout", {}).items()},
                        **{f"local_leaderboard_{m}": v for m, v in methods[name].get("local_leaderboard", {}).items()},
                    },
                )
                for name in run.fitted
            },
            run.chosen,
            tags={"stage": "ensemble"},
            artifacts={name: methods[name]["submission"] for name in run.fitted},
        )
