"""The regression task: one number per image, a score (PetFinder's Pawpularity, RMSE) or an ordinal grade
(APTOS's and PANDA's, quadratic weighted kappa).

Targets are (N, 1) float32 in the target's units. The head has one output, trained in a scaled space fitted
on each fold's training rows only (`fit_target`, stored in the checkpoint as `target_scale`): standardised
for `train.regression_loss` mse and smooth_l1, or min-max scaled to [0, 1] through a sigmoid for bce. A
view's output is already back in the target's units, clipped to the fold's training range, so TTA views,
seeds, folds and ensemble members are averaged in units. A graded target (integer values, `grades` in
classes.json) is decided by rounding to the nearest grade; the fitted last step (pipeline/postprocess.py,
`cuts`) moves the cut points between grades, mapping predictions piecewise-linearly so that each fitted
cut lands half-way between its grades: the files stay continuous and rounding gives the fitted grades.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import cohen_kappa_score, confusion_matrix

from pipeline.config import ConfigError
from pipeline.errors import PipelineError
from pipeline.probs import read_prediction_file
from pipeline.submission import SubmissionFormat, check_submission_layout
from pipeline.tasks import Task, answer_of, register_task
from pipeline.tasks.single_label import SingleLabel

MAX_GRADES = 100  # an integer target with at most this many distinct values is graded (kappa, cut points)
N_BINS = 10  # quantile bins the folds, the holdout and the report's slices are stratified on

# ---------------------------------------------------------------- metrics (predictions (N, 1), targets (N, 1))


def rmse(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred, np.float64) - y) ** 2)))


def mae(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(pred, np.float64) - y)))


def to_grades(pred: np.ndarray, grades: np.ndarray) -> np.ndarray:
    """Each prediction's grade index: the nearest grade (a prediction half-way goes up), so a cut point
    between grades g and g' sits at (g + g') / 2."""
    mids = (grades[1:] + grades[:-1]) / 2
    return np.searchsorted(mids, np.ravel(pred), side="right")


def quadratic_weighted_kappa(pred: np.ndarray, y: np.ndarray, grades=None) -> float:
    """Cohen's kappa with quadratic weights of the predictions rounded to the nearest grade (`grades`:
    the training target's integer values) against the true grades. 1 = perfect, 0 = chance."""
    grades = np.asarray(grades, dtype=np.float64)
    p, t = to_grades(pred, grades), to_grades(y, grades)
    if (p == t).all():
        return 1.0  # sklearn gives nan when a single grade is both predicted and true
    return float(cohen_kappa_score(t, p, weights="quadratic", labels=np.arange(len(grades))))


# name -> (function, greater is better)
METRICS = {
    "rmse": (rmse, False),
    "mae": (mae, False),
    "quadratic_weighted_kappa": (quadratic_weighted_kappa, True),
}
CLASSIFICATION_SETTINGS = {  # train settings a regression cannot use: key -> the value that means "off"
    "class_weight": "none",
    "sampler": "uniform",
    "label_smoothing": 0.0,
}


def target_bins(values: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Each row's quantile bin of `values` (at most `n_bins`; fewer where values repeat, e.g. grades)."""
    v = np.ravel(values).astype(np.float64)
    edges = np.unique(np.quantile(v, np.linspace(0, 1, n_bins + 1)[1:-1]))
    return np.searchsorted(edges, v, side="right")


def read_numbers(labels: pd.Series, where: str) -> np.ndarray:
    """The target column as floats; a one-line error naming the first row that is not a finite number."""
    values = pd.to_numeric(labels, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        r = int(bad[0])
        raise PipelineError(
            f"{where}: row {r + 2}: target '{labels.iloc[r]}' is not a number ({len(bad)} such rows; "
            f"competition.task: regression reads a numeric column)"
        )
    return values


def graded(values: np.ndarray) -> list[float] | None:
    """The grades of an integer target with at most MAX_GRADES distinct values, else None."""
    unique = np.unique(values)
    if len(unique) <= MAX_GRADES and np.allclose(unique, np.round(unique)):
        return [float(v) for v in unique]
    return None


# ---------------------------------------------------------------- the task


@register_task("regression")
class Regression(Task):
    """One number per image; `low` and `high` are the training target's range, `grades` its integer values
    (a graded target, else None), `scale` what a fold fitted on its training rows (`fit_target`)."""

    METRICS = METRICS
    ENSEMBLE_METHODS = ("soft_voting", "caruana", "optimized", "stacking")
    MULTI_HOT = True  # dense (N, 1) targets: mixup mixes them as they are (linearly)
    PROXY = "rmse"
    CLASS_WORD = "slice of the target"

    def __init__(self, classes=(), low: float = 0.0, high: float = 1.0, grades=None, scale: dict | None = None):
        self.low, self.high = float(low), float(high)
        self.grades = None if grades is None else [float(g) for g in grades]
        # the report's slices of the target, named as its classes: the grades, or equal-width bins of the range
        self.graded_slices = self.grades is not None and len(self.grades) <= 2 * N_BINS
        if self.graded_slices:
            super().__init__([f"{g:g}" for g in self.grades])
        else:
            edges = np.linspace(self.low, self.high, N_BINS + 1)
            super().__init__([f"{a:.4g}-{b:.4g}" for a, b in zip(edges[:-1], edges[1:])])
        self.scale = scale  # fitted on a fold's training rows (fit_target), None before
        if self.grades is None:  # kappa is only defined on grades
            self.METRICS = {k: v for k, v in METRICS.items() if k != "quadratic_weighted_kappa"}

    @property
    def options(self) -> dict:
        return {"low": self.low, "high": self.high, "grades": self.grades}

    def bind(self, name: str):
        fn = super().bind(name)
        grades = self.grades
        return (lambda p, y: fn(p, y, grades=grades)) if name == "quadratic_weighted_kappa" else fn

    @property
    def columns(self) -> list[str]:
        return ["prediction"]

    @property
    def n_outputs(self) -> int:
        return 1

    # ------------------------------------------------------------ reading the target

    @classmethod
    def from_labels(cls, labels: pd.Series, where: str = "train.csv") -> "Regression":
        values = read_numbers(labels, where)
        if values.min() == values.max():
            raise PipelineError(f"{where}: the target is constant ({values[0]:g} in every row): nothing to learn")
        return cls(low=values.min(), high=values.max(), grades=graded(values))

    def check_labels(self, labels: pd.Series, n_folds: int, where: str) -> None:
        values = read_numbers(labels, where)
        if len(values) < n_folds or values.min() == values.max():
            raise PipelineError(f"{where}: {len(values)} rows with {len(np.unique(values))} target values: too few")

    def class_counts(self, labels: pd.Series) -> np.ndarray:
        """None: a regression has no class that skipped images can leave without rows (its report slices may
        be empty from the start, a grade the training rows lack only narrows the range)."""
        return np.zeros(0, dtype=int)

    def encode(self, labels) -> np.ndarray:
        """Each row's target, (N, 1) float32."""
        return pd.to_numeric(pd.Series(labels)).to_numpy(dtype=np.float32).reshape(-1, 1)

    def stratify_on(self, labels) -> np.ndarray:
        """The folds' and the holdout's strata: quantile bins of the target, or a graded target's grades
        (the folds single-label classes of the same grades get)."""
        values = labels if isinstance(labels, np.ndarray) and labels.dtype.kind == "f" else self.encode(labels)
        return self.bin_of(values) if self.graded_slices else target_bins(values)

    # the folds, the holdout and max_train_rows of one stratum per row: single-label's (stratified, group-aware)
    split = SingleLabel.split
    holdout_rows = SingleLabel.holdout_rows
    subsample_rows = SingleLabel.subsample_rows

    def default_sample(self, ids: list[str]) -> pd.DataFrame:
        return pd.DataFrame({"id": ids, "target": self.low})

    # ------------------------------------------------------------ the model

    def check_settings(self, s, where: str) -> None:
        for key, off in CLASSIFICATION_SETTINGS.items():
            if getattr(s, key) != off:
                raise ConfigError(f"{where}: train.{key}: {getattr(s, key)} is not defined for a regression task")

    def fit_target(self, targets: np.ndarray, s) -> "Regression":
        """The task as a fold trains it: the target's scaling fitted on these (training) rows. The sklearn
        head and mse / smooth_l1 standardise; bce scales the training range to [0, 1]."""
        y = np.asarray(targets, dtype=np.float64).ravel()
        kind = "unit" if s.regression_loss == "bce" and s.finetune != "features+sklearn" else "standard"
        scale = {
            "kind": kind,
            "loss": "mse" if s.finetune == "features+sklearn" else s.regression_loss,
            "mean": float(y.mean()),
            "std": float(y.std()) or 1.0,
            "low": float(y.min()),
            "high": float(y.max()),
        }
        return Regression(low=self.low, high=self.high, grades=self.grades, scale=scale)

    def for_model(self, ckpt: dict) -> "Regression":
        """The task as a fold model predicts: its checkpoint's scaling."""
        if not ckpt.get("target_scale"):
            raise PipelineError(f"fold {ckpt.get('fold')}: the checkpoint has no target_scale (train it again)")
        return Regression(low=self.low, high=self.high, grades=self.grades, scale=ckpt["target_scale"])

    @property
    def target_state(self) -> dict | None:
        return self.scale

    def to_model_space(self, y: torch.Tensor | np.ndarray):
        """Targets in units -> the space the loss compares the head's outputs with."""
        s = self.scale
        if s["kind"] == "unit":
            return (y - s["low"]) / (s["high"] - s["low"])
        return (y - s["mean"]) / s["std"]

    def loss(self, logits, y, soft: bool, label_smoothing: float = 0.0, class_weight=None) -> torch.Tensor:
        """MSE or smooth L1 on the standardised target, or BCE of the sigmoid against the target scaled
        to [0, 1] (Pawpularity's); mixup has mixed the targets linearly (`soft`), which scaling keeps."""
        t = self.to_model_space(y.float().reshape(logits.shape))
        z = logits.float()
        if self.scale["loss"] == "bce":
            return F.binary_cross_entropy_with_logits(z, t.clamp(0, 1))
        if self.scale["loss"] == "smooth_l1":
            return F.smooth_l1_loss(z, t)
        return F.mse_loss(z, t)

    def class_weight(self, targets, how: str, device):
        return None

    def sample_weights(self, targets):  # pragma: no cover - check_settings refuses
        raise ConfigError("train.sampler: balanced is not defined for a regression task")

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """A view's prediction in the target's units, clipped to the fold's training range."""
        s, z = self.scale, logits.float()
        value = (
            s["low"] + (s["high"] - s["low"]) * torch.sigmoid(z) if s["kind"] == "unit" else s["mean"] + s["std"] * z
        )
        return value.clamp(s["low"], s["high"])

    # ------------------------------------------------------------ predictions

    def merge(self, outputs: np.ndarray, how: str) -> np.ndarray:
        """(V, N, 1) views' predictions -> their mean (every `tta.merge` means the mean of the values)."""
        if how not in ("mean", "geometric", "logits"):
            raise ValueError(f"unknown TTA merge '{how}' (mean, geometric or logits)")
        return outputs.mean(0)

    def read_predictions(self, path, ids, where: str) -> np.ndarray:
        return read_prediction_file(path, ids, self.columns, where)

    def postprocess_candidates(self, metric: str) -> list[str]:
        """Kappa on a graded target: cut points fitted between the grades."""
        return ["identity", "cuts"] if metric == "quadratic_weighted_kappa" else ["identity"]

    # ------------------------------------------------------------ the submission

    def submission_format(self, sample: pd.DataFrame, where: str, positive_class=None, metric=None) -> SubmissionFormat:
        """The sample's one numeric column: grades for kappa, integers where the sample's values are integers,
        else numbers."""
        if sample.shape[1] != 2:
            raise PipelineError(f"{where}: a regression submission is an id column and one value column")
        id_col, col = list(sample.columns)
        if metric == "quadratic_weighted_kappa":
            if self.grades is None:
                raise PipelineError(f"{where}: quadratic_weighted_kappa needs an integer target (grades)")
            return SubmissionFormat(id_col, [col], "grade")
        values = pd.to_numeric(sample[col], errors="coerce")
        integer = bool(values.notna().all() and np.allclose(values, np.round(values)) and self.grades is not None)
        return SubmissionFormat(id_col, [col], "integer" if integer else "number")

    def submission(self, ids: list[str], pred: np.ndarray, fmt: SubmissionFormat) -> pd.DataFrame:
        values = np.ravel(pred)
        if fmt.kind == "grade":
            grades = np.asarray(self.grades)
            values = grades[to_grades(values, grades)].astype(np.int64)
        elif fmt.kind == "integer":
            values = np.round(values).astype(np.int64)
        frame = pd.DataFrame({fmt.columns[0]: values})
        frame.insert(0, fmt.id_column, ids)
        return frame

    def check_submission(self, sub: pd.DataFrame, sample: pd.DataFrame, fmt: SubmissionFormat) -> None:
        values = pd.to_numeric(check_submission_layout(sub, sample, fmt).iloc[:, 0], errors="coerce")
        bad = np.flatnonzero(~np.isfinite(values.to_numpy(dtype=float)))
        if len(bad):
            raise PipelineError(f"submission row {bad[0] + 2}: '{sub.iloc[bad[0], 1]}' is not a number")
        if fmt.kind == "grade":
            off = np.flatnonzero(~values.isin(self.grades))
            if len(off):
                raise PipelineError(f"submission row {off[0] + 2}: {values.iloc[off[0]]} is not a grade of train.csv")

    def leaderboard(self, answers: pd.DataFrame, ids: list[str], pred: np.ndarray) -> dict[str, float]:
        truth = answer_of(answers, ids)
        return self.scores(pred, read_numbers(pd.Series([truth[i] for i in ids]), "answers.csv").reshape(-1, 1))

    # ------------------------------------------------------------ the error report
    # Its "classes" are slices of the target: the grades, or N_BINS equal-width bins of the training range. A
    # row is wrong when it is predicted in another slice than its true value's (a graded target: another
    # grade), which the error-rate slices and the advice test; calibration is the spread's: each bin of
    # predictions against the mean true value of its rows.

    CALIBRATION = ("predicted (share of the training range)", "mean true value (same scale)")
    HAS_CONFIDENCE = False
    NEVER_PREDICTED_HINT = "the predictions shrink towards the mean: see each bin's bias; try stacking's ridge"

    def describe(self) -> str:
        kind = f"{len(self.grades)} grades" if self.grades is not None else "a score"
        return f"{kind} from {self.low:g} to {self.high:g}"

    def bin_of(self, values: np.ndarray) -> np.ndarray:
        """Each value's slice index."""
        v = np.ravel(values).astype(np.float64)
        if self.graded_slices:
            return to_grades(v, np.asarray(self.grades))
        width = (self.high - self.low) / N_BINS
        return np.clip(np.floor((v - self.low) / width), 0, N_BINS - 1).astype(np.int64)

    def truth(self, y: np.ndarray) -> np.ndarray:
        """What a row's predicted slice is compared with: its true value's slice (or slices already)."""
        y = np.asarray(y)
        return y if y.ndim == 1 and y.dtype.kind in "iu" else self.bin_of(y)

    def predicted(self, pred: np.ndarray) -> np.ndarray:
        """Each row's predicted slice (grade)."""
        return self.bin_of(pred)

    def row_losses(self, pred: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Each row's absolute error."""
        return np.abs(np.ravel(pred) - np.ravel(y))

    def errors(self, pred: np.ndarray, y: np.ndarray) -> np.ndarray:
        return pred != self.truth(y)

    def confidence(self, pred: np.ndarray) -> np.ndarray:
        """A regression states no confidence: every row 1 (the galleries rank by absolute error instead)."""
        return np.ones(len(pred))

    def _share(self, values: np.ndarray) -> np.ndarray:
        return np.clip((np.ravel(values) - self.low) / (self.high - self.low), 0.0, 1.0)

    def calibration(self, pred: np.ndarray, bins: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(prediction, true value) of every row, as shares of the training range: the reliability table's
        bins of predictions hold the mean true value of their rows (high scores under-predicted: above)."""
        return self._share(pred), self._share(y)

    def confusion(self, pred: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(slices, slices) counts: row = the true value's slice, column = the predicted one."""
        return confusion_matrix(self.truth(y), pred, labels=np.arange(len(self.classes)))

    def pair_mask(self, pred: np.ndarray, y: np.ndarray, t: int, p: int) -> np.ndarray:
        return (self.truth(y) == t) & (pred == p)

    def pair_strength(self, pred: np.ndarray, losses: np.ndarray, rows: np.ndarray, p: int) -> np.ndarray:
        """A confusion cell's examples, the largest absolute error first."""
        return losses[rows]

    def predicted_counts(self, pred: np.ndarray) -> np.ndarray:
        return np.bincount(pred, minlength=len(self.classes))

    def label_text(self, values: np.ndarray) -> list[str]:
        """A value as a number; a slice index by its name."""
        values = np.asarray(values)
        if values.dtype.kind in "iu":
            return [self.classes[i] for i in values]
        return [f"{v:.4g}" for v in np.ravel(values)]

    def per_class_extras(self, pred: np.ndarray, y: np.ndarray) -> dict:
        """The residuals of each slice's rows (by true value): mean true, mean predicted, bias (predicted -
        true: negative where that slice is under-predicted), MAE and RMSE."""
        p, t, bins = np.ravel(pred), np.ravel(y), self.truth(y)
        out = {k: np.full(len(self.classes), np.nan) for k in ("mean_true", "mean_predicted", "bias", "mae", "rmse")}
        for b in np.unique(bins):
            rows = bins == b
            e = p[rows] - t[rows]
            out["mean_true"][b], out["mean_predicted"][b] = t[rows].mean(), p[rows].mean()
            out["bias"][b], out["mae"][b], out["rmse"][b] = e.mean(), np.abs(e).mean(), np.sqrt((e**2).mean())
        return out
