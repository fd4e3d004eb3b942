"""The single-label task: one class per image, multiclass or binary (two classes).

Targets are class indices; a model's head has one logit per class, trained with cross-entropy; a view's
output is its log-softmax and predictions are class probabilities (rows sum to 1), written one column per
class; the submission is a label column, a probability column per class, or a binary competition's one
probability column.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import cohen_kappa_score, confusion_matrix, f1_score, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from pipeline.errors import PipelineError
from pipeline.probs import read_prediction_file
from pipeline.submission import SubmissionFormat, check_submission_layout, read_submission_format
from pipeline.tasks import Task, answer_of, register_task

# ---------------------------------------------------------------- metrics


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
METRICS = {
    "accuracy": (accuracy, True),
    "log_loss": (log_loss, False),
    "macro_f1": (macro_f1, True),
    "roc_auc": (roc_auc, True),
    "quadratic_weighted_kappa": (quadratic_weighted_kappa, True),
}


def vote_shares(probs: np.ndarray) -> np.ndarray:
    """Hard voting over members' probabilities (M, N, C): each row's vote share per class, with the mean
    probability mixed in at a weight too small to overturn a vote (votes + mean / 2, normalised): its
    argmax is the vote, and its log loss finite."""
    m, n, c = probs.shape
    votes = np.zeros((n, c))
    for member in probs:
        votes[np.arange(n), member.argmax(1)] += 1
    return (votes + probs.mean(0) / 2) / (m + 0.5)


def ordered(classes: list[str]) -> bool:
    """Whether class names are grades (every one an integer): what quadratic weighted kappa needs."""
    try:
        [int(c) for c in classes]
    except ValueError:
        return False
    return True


def sort_classes(labels) -> list[str]:
    """Class order: numeric when every label is an integer ('2' < '10'), else lexicographic."""
    unique = set(labels)
    try:
        return sorted(unique, key=lambda s: int(s))
    except ValueError:
        return sorted(unique)


# ---------------------------------------------------------------- the task


@register_task("single_label")
class SingleLabel(Task):
    """One class per image (multiclass; binary as two classes)."""

    METRICS = METRICS
    ENSEMBLE_METHODS = ("soft_voting", "hard_voting", "caruana", "optimized", "rank_average", "stacking")

    def __init__(self, classes: list[str]):
        super().__init__(classes)
        if not ordered(self.classes):  # kappa weighs the distance between grades: names have none
            self.METRICS = {k: v for k, v in METRICS.items() if k != "quadratic_weighted_kappa"}

    @classmethod
    def from_labels(cls, labels: pd.Series) -> "SingleLabel":
        return cls(sort_classes(labels))

    @staticmethod
    def check_labels(labels: pd.Series, n_folds: int, where: str) -> None:
        """Every class must have a row in each of `n_folds` folds."""
        counts = labels.value_counts()
        rare = counts[counts < n_folds]
        if len(rare):
            raise PipelineError(
                f"{where}: class '{rare.index[0]}' has {int(rare.iloc[0])} examples, fewer than cv.n_folds={n_folds}"
            )

    def class_counts(self, labels: pd.Series) -> np.ndarray:
        """Each class's number of rows."""
        return np.bincount(self.encode(labels), minlength=len(self.classes))

    def subsample_rows(self, stratify: np.ndarray, n: int, seed: int) -> np.ndarray:
        """`n` rows stratified on `stratify` (competition.max_train_rows)."""
        return train_test_split(np.arange(len(stratify)), train_size=n, stratify=stratify, random_state=seed)[0]

    def encode(self, labels: pd.Series) -> np.ndarray:
        """Each row's class index."""
        return labels.map({c: i for i, c in enumerate(self.classes)}).astype(np.int64).to_numpy()

    def stratify_on(self, labels) -> np.ndarray:
        """What the folds and the holdout are stratified on: the class."""
        return np.asarray(labels)

    def split(self, stratify: np.ndarray, n_splits: int, seed: int, groups: np.ndarray | None):
        """(train, validation) index pairs: StratifiedKFold, or StratifiedGroupKFold with groups."""
        if groups is None:
            return StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(stratify, stratify)
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        return splitter.split(stratify, stratify, groups)

    def holdout_rows(self, stratify: np.ndarray, share: float, seed: int, groups: np.ndarray | None) -> np.ndarray:
        """`cv.holdout`'s rows: a stratified `share`; with groups, one part of a split into round(1 / share)."""
        if groups is None:
            return train_test_split(np.arange(len(stratify)), test_size=share, stratify=stratify, random_state=seed)[1]
        return next(self.split(stratify, max(2, round(1 / share)), seed, groups))[1]

    def default_sample(self, ids: list[str]) -> pd.DataFrame:
        """The submission's layout when the competition ships no sample: `id,label`."""
        return pd.DataFrame({"id": ids, "label": self.classes[0]})

    # ------------------------------------------------------------ the model

    def loss(
        self,
        logits: torch.Tensor,
        y: torch.Tensor,
        soft: bool,
        label_smoothing: float = 0.0,
        class_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cross-entropy (`soft`: against mixup's mixed, already smoothed targets). Class weights scale each
        example's loss, averaged over the batch (not over the weights, as cross_entropy's `weight` does: that
        renormalises per batch and undoes most of the weighting)."""
        if soft:
            terms = -y * F.log_softmax(logits.float(), dim=-1)
            return (terms if class_weight is None else terms * class_weight).sum(-1).mean()
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing, reduction="none")
        return (loss if class_weight is None else loss * class_weight[y]).mean()

    def class_weight(self, targets: np.ndarray, how: str, device) -> torch.Tensor | None:
        """`train.class_weight: balanced`: n / (C x count) of the fold's training rows, equal totals per class."""
        if how != "balanced":
            return None
        counts = np.maximum(np.bincount(targets, minlength=self.n_outputs), 1)
        return torch.as_tensor(len(targets) / (self.n_outputs * counts), dtype=torch.float32, device=device)

    def sample_weights(self, targets: np.ndarray) -> np.ndarray:
        """`train.sampler: balanced`: a row's weight, so that every class is drawn equally often."""
        return 1.0 / np.bincount(targets)[targets]

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """A view's log-probabilities."""
        return torch.log_softmax(logits, dim=1)

    # ------------------------------------------------------------ predictions

    def merge(self, log_probs: np.ndarray, how: str) -> np.ndarray:
        """Merge (V, N, C) per-view log-probabilities into (N, C) probabilities.

        mean: arithmetic mean of the probabilities. geometric: their geometric mean, renormalised.
        logits: softmax of the mean logits. The last two are the same thing (a view's log-probabilities
        are its logits minus a per-row constant, which the softmax removes); both names are accepted.
        """
        if how == "mean":
            return np.exp(log_probs).mean(0)
        if how in ("geometric", "logits"):
            z = log_probs.mean(0)
            z = np.exp(z - z.max(1, keepdims=True))
            return z / z.sum(1, keepdims=True)
        raise ValueError(f"unknown TTA merge '{how}' (mean, geometric or logits)")

    def postprocess_candidates(self, metric: str) -> list[str]:
        """The fitted last steps to choose from (pipeline/postprocess.py): temperature for log loss."""
        return ["identity", "temperature"] if metric == "log_loss" else ["identity"]

    def temperature(self, probs: np.ndarray, t: float) -> np.ndarray:
        """The softmax of the log-probabilities divided by `t` (t > 1 softens, t < 1 sharpens)."""
        z = np.log(np.clip(probs, 1e-15, 1.0)) / t
        z = np.exp(z - z.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)

    def read_predictions(self, path, ids, where: str) -> np.ndarray:
        """Probabilities from `path`, checked against the expected ids, the classes, and summing to 1 per row."""
        probs = read_prediction_file(path, ids, self.columns, where)
        bad = np.flatnonzero(~np.isclose(probs.sum(1), 1.0, atol=1e-4) | (probs < 0).any(1))
        if len(bad):
            raise PipelineError(
                f"{where}: {path} row {bad[0] + 2}: probabilities sum to {probs[bad[0]].sum():.6g}, "
                f"not 1 ({len(bad)} such rows)"
            )
        return probs

    # ------------------------------------------------------------ the submission

    def submission_format(
        self, sample: pd.DataFrame, where: str, positive_class: str | None = None, metric: str | None = None
    ) -> SubmissionFormat:
        return read_submission_format(sample, self.classes, where, positive_class, metric)

    def submission(self, ids: list[str], probs: np.ndarray, fmt: SubmissionFormat) -> pd.DataFrame:
        """The sample submission's layout filled with predictions mapped back to the original labels."""
        if fmt.kind == "label":
            values = {fmt.columns[0]: np.asarray(self.classes, dtype=object)[self.predicted(probs)]}
        elif fmt.kind == "probability":
            values = {fmt.columns[0]: probs[:, self.classes.index(fmt.positive)]}
        else:
            index = {c: i for i, c in enumerate(self.classes)}
            values = {c: probs[:, index[c]] for c in fmt.columns}
        frame = pd.DataFrame(values)
        frame.insert(0, fmt.id_column, ids)
        return frame

    def check_submission(self, sub: pd.DataFrame, sample: pd.DataFrame, fmt: SubmissionFormat) -> None:
        """Raise PipelineError unless `sub` has the sample's columns, ids and order, and valid values."""
        values = check_submission_layout(sub, sample, fmt)
        if fmt.kind == "label":
            bad = ~values.iloc[:, 0].astype(str).isin(set(self.classes))
            if bad.any():
                raise PipelineError(
                    f"submission row {int(np.flatnonzero(bad)[0]) + 2}: label is not a class of train.csv"
                )
        else:
            p = values.to_numpy(dtype=float)
            if (
                (p < 0).any()
                or (p > 1).any()
                or (fmt.kind == "probabilities" and not np.allclose(p.sum(1), 1.0, atol=1e-4))
            ):
                raise PipelineError("submission probabilities must lie in [0, 1] and sum to 1 per row")

    def leaderboard(self, answers: pd.DataFrame, ids: list[str], probs: np.ndarray) -> dict[str, float]:
        """Every metric against the competition's answer file (id, label). Only reported, never fitted on."""
        truth = answer_of(answers, ids)
        index = {c: k for k, c in enumerate(self.classes)}
        unknown = [truth[i] for i in ids if truth[i] not in index]
        if unknown:
            raise PipelineError(f"answers.csv: label '{unknown[0]}' is not a class of train.csv")
        return self.scores(probs, np.array([index[truth[i]] for i in ids]))

    # ------------------------------------------------------------ the error report

    def predicted(self, probs: np.ndarray) -> np.ndarray:
        """Each row's predicted class index: the most probable class."""
        return probs.argmax(1)

    def row_losses(self, probs: np.ndarray, y: np.ndarray, eps: float = 1e-15) -> np.ndarray:
        """Each row's log loss: the negative log-probability of its true class."""
        return -np.log(np.clip(probs[np.arange(len(y)), y], eps, 1.0))

    def errors(self, pred: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Each row: is its prediction wrong."""
        return pred != y

    def confidence(self, probs: np.ndarray) -> np.ndarray:
        """Each row's confidence: the predicted class's probability."""
        return probs.max(1)

    def calibration(self, probs: np.ndarray, pred: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(confidence, correct) of every decision the reliability diagram bins: one per row."""
        return probs.max(1), pred == y

    def confusion(self, pred: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(C, C) counts: row = true class, column = predicted class (scikit-learn's)."""
        return confusion_matrix(y, pred, labels=np.arange(len(self.classes)))

    def pair_mask(self, pred: np.ndarray, y: np.ndarray, t: int, p: int) -> np.ndarray:
        """The rows of confusion cell (t, p): class t predicted as p."""
        return (y == t) & (pred == p)

    def predicted_counts(self, pred: np.ndarray) -> np.ndarray:
        """How often each class is predicted."""
        return np.bincount(pred, minlength=len(self.classes))

    def label_text(self, values: np.ndarray) -> list[str]:
        """Each row's label (a target or a prediction) as the competition spells it."""
        return [self.classes[i] for i in values]

    def per_class_extras(self, probs: np.ndarray, y: np.ndarray) -> dict:
        """Columns the per-class table adds for this task (none)."""
        return {}
