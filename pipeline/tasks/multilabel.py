"""The multi-label task: any number of labels per image (Planet's tags, HPA's class ids, RANZCR's columns).

Targets are multi-hot rows (N, C) of 0/1; the head has one logit per label, trained with binary
cross-entropy; a view's output is its logits, and predictions are per-label probabilities (independent,
rows need not sum to 1). A label is predicted where its probability is >= 0.5: fitted thresholds
(pipeline/postprocess.py) rescale each label's probabilities so that 0.5 is its threshold. The
submission is a tag column (the labels joined by a delimiter) or one probability column per label.
Prepared labels are the tags joined by the task's `delimiter` (classes.json).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, fbeta_score, roc_auc_score

from pipeline.config import ConfigError
from pipeline.errors import PipelineError
from pipeline.probs import read_prediction_file
from pipeline.submission import SubmissionFormat, check_submission_layout
from pipeline.tasks import Task, answer_of, register_task
from pipeline.tasks.single_label import sort_classes

# ---------------------------------------------------------------- metrics (probabilities (N, C), multi-hot (N, C))


def _decide(probs: np.ndarray) -> np.ndarray:
    return (probs >= 0.5).astype(int)


def f_beta(probs: np.ndarray, y: np.ndarray, beta: float = 1.0) -> float:
    """F-beta of each image's predicted label set against its true one, averaged over images (Planet's F2:
    beta=2, `competition.beta`); an image with no true and no predicted label scores 1."""
    return float(fbeta_score(y, _decide(probs), beta=beta, average="samples", zero_division=1.0))


def micro_f1(probs: np.ndarray, y: np.ndarray) -> float:
    """F1 of all (image, label) decisions pooled."""
    return float(f1_score(y, _decide(probs), average="micro", zero_division=0.0))


def macro_f1(probs: np.ndarray, y: np.ndarray) -> float:
    """Unweighted mean of each label's F1 (HPA's metric); a label never predicted nor present scores 0."""
    return float(f1_score(y, _decide(probs), average="macro", zero_division=0.0))


def mean_column_auc(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean over labels of each label's ROC AUC (RANZCR's), over the labels with positives and negatives."""
    aucs = [roc_auc_score(y[:, c], probs[:, c]) for c in range(y.shape[1]) if 0 < y[:, c].sum() < len(y)]
    return float(np.mean(aucs)) if aucs else float("nan")


def log_loss(probs: np.ndarray, y: np.ndarray, eps: float = 1e-15) -> float:
    """Mean binary cross-entropy over every (image, label): the smooth proxy that picks epochs and TTA
    (in float64: float32 rounds 1 - 1e-15 to 1, and a certain wrong label would be 0 x inf)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


# name -> (function, greater is better)
METRICS = {
    "f_beta": (f_beta, True),
    "micro_f1": (micro_f1, True),
    "macro_f1": (macro_f1, True),
    "mean_column_auc": (mean_column_auc, True),
    "log_loss": (log_loss, False),
}
DECISION_METRICS = ("f_beta", "micro_f1", "macro_f1")  # scored on decided label sets: thresholds are fitted


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def logit(p: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


def rescale(probs: np.ndarray, thresholds: np.ndarray, at_least_one: bool) -> np.ndarray:
    """Each label's probabilities mapped piecewise-linearly so that its threshold becomes 0.5; with
    `at_least_one`, an image with none >= 0.5 gets its highest rescaled label raised to 0.5."""
    t = np.broadcast_to(np.asarray(thresholds, dtype=float), probs.shape[1:])
    out = np.where(probs < t, 0.5 * probs / t, 0.5 + 0.5 * (probs - t) / (1 - t))
    if at_least_one:
        empty = np.flatnonzero((out < 0.5).all(1))
        top = out[empty].argmax(axis=1)
        out[empty, top] = 0.5
    return out


# ---------------------------------------------------------------- the task


@register_task("multilabel")
class MultiLabel(Task):
    """Any number of labels per image; `delimiter` joins an image's labels in the prepared train.csv,
    `beta` is `f_beta`'s (competition.beta)."""

    METRICS = METRICS
    ENSEMBLE_METHODS = ("soft_voting", "caruana", "optimized", "rank_average", "stacking")
    MULTI_HOT = True  # targets are multi-hot rows: mixup mixes them as they are
    CLASS_WORD = "label"

    def __init__(self, classes: list[str], delimiter: str = " ", beta: float = 1.0):
        super().__init__(classes)
        self.delimiter, self.beta = delimiter, float(beta)

    @property
    def options(self) -> dict:
        return {"delimiter": self.delimiter, "beta": self.beta}

    def bind(self, name: str):
        fn = self.METRICS[name][0]
        return (lambda p, y: fn(p, y, beta=self.beta)) if name == "f_beta" else fn

    # ------------------------------------------------------------ reading the labels

    @classmethod
    def from_labels(cls, labels: pd.Series, delimiter: str = " ", beta: float = 1.0) -> "MultiLabel":
        tags = [t for value in labels for t in split_tags(value, delimiter)]
        return cls(sort_classes(tags), delimiter, beta)

    def check_labels(self, labels: pd.Series, n_folds: int, where: str) -> None:
        """A label needs as many images as folds to be in every fold's validation part; rarer labels are
        allowed (a warning), as real multi-label competitions have them (HPA's rarest: a handful)."""
        counts = self.class_counts(labels)
        rare = [(c, int(n)) for c, n in zip(self.classes, counts) if n < n_folds]
        if rare:
            shown = ", ".join(f"'{c}' ({n})" for c, n in rare[:5])
            print(f"warning: {where}: {len(rare)} labels have fewer images than cv.n_folds={n_folds}: {shown}")

    def class_counts(self, labels: pd.Series) -> np.ndarray:
        """Each label's number of images."""
        return self.encode(labels).sum(0).astype(int)

    def subsample_rows(self, stratify: np.ndarray, n: int, seed: int) -> np.ndarray:
        """`n` rows stratified on the labels (MultilabelStratifiedShuffleSplit; competition.max_train_rows)."""
        from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

        splitter = MultilabelStratifiedShuffleSplit(n_splits=1, train_size=n, random_state=seed)
        return next(splitter.split(np.zeros(len(stratify)), stratify))[0]

    def encode(self, labels: pd.Series) -> np.ndarray:
        """Each row's multi-hot (N, C) float32 row."""
        index = {c: i for i, c in enumerate(self.classes)}
        out = np.zeros((len(labels), len(self.classes)), dtype=np.float32)
        for r, value in enumerate(labels):
            for t in split_tags(value, self.delimiter):
                out[r, index[t]] = 1.0
        return out

    def stratify_on(self, labels) -> np.ndarray:
        """The multi-hot rows of `labels` (prepared label strings, or already encoded)."""
        if isinstance(labels, np.ndarray) and labels.ndim == 2:
            return labels
        return self.encode(pd.Series(labels))

    def split(self, stratify: np.ndarray, n_splits: int, seed: int, groups: np.ndarray | None):
        """(train, validation) index pairs: iterative stratification (MultilabelStratifiedKFold, Sechidis et
        al. 2011); with groups, the same over groups, each group one item carrying the sum of its rows'
        labels (binarised), so groups stay whole and labels are balanced as their groups allow."""
        from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

        splitter = MultilabelStratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        if groups is None:
            yield from splitter.split(np.zeros(len(stratify)), stratify)
            return
        names, member = np.unique(groups, return_inverse=True)
        per_group = np.zeros((len(names), stratify.shape[1]))
        np.add.at(per_group, member, stratify)
        for train_g, val_g in splitter.split(np.zeros(len(names)), (per_group > 0).astype(int)):
            yield np.flatnonzero(np.isin(member, train_g)), np.flatnonzero(np.isin(member, val_g))

    def holdout_rows(self, stratify: np.ndarray, share: float, seed: int, groups: np.ndarray | None) -> np.ndarray:
        """`cv.holdout`'s rows: one part of a split into round(1 / share) parts."""
        return next(self.split(stratify, max(2, round(1 / share)), seed, groups))[1]

    def default_sample(self, ids: list[str]) -> pd.DataFrame:
        return pd.DataFrame({"id": ids, "tags": self.classes[0]})

    # ------------------------------------------------------------ the model

    def check_settings(self, s, where: str) -> None:
        if s.sampler != "uniform":
            raise ConfigError(
                f"{where}: train.sampler: {s.sampler} is not defined for a multi-label task (uniform; "
                f"train.class_weight: balanced sets BCE's pos_weight instead)"
            )

    def loss(self, logits, y, soft: bool, label_smoothing: float = 0.0, class_weight=None) -> torch.Tensor:
        """Mean BCE-with-logits over every (image, label); `class_weight` is BCE's pos_weight. Label smoothing
        as timm's BinaryCrossEntropy smooths dense targets (towards 0.5); under mixup, timm's multi-label
        Mixup has already smoothed them."""
        y = y.float()
        if not soft and label_smoothing:
            y = y * (1.0 - label_smoothing) + 0.5 * label_smoothing
        return F.binary_cross_entropy_with_logits(logits.float(), y, pos_weight=class_weight)

    def class_weight(self, targets: np.ndarray, how: str, device):
        """`train.class_weight: balanced`: BCE's pos_weight, negatives / positives of each label among the
        fold's training rows (a label without positives weighs 1)."""
        if how != "balanced":
            return None
        pos = targets.sum(0)
        weight = np.where(pos > 0, (len(targets) - pos) / np.maximum(pos, 1), 1.0)
        return torch.as_tensor(weight, dtype=torch.float32, device=device)

    def sample_weights(self, targets: np.ndarray) -> np.ndarray:  # pragma: no cover - check_settings refuses
        raise ConfigError("train.sampler: balanced is not defined for a multi-label task")

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """A view's logits."""
        return logits.float()

    # ------------------------------------------------------------ predictions

    def merge(self, logits: np.ndarray, how: str) -> np.ndarray:
        """Merge (V, N, C) per-view logits into (N, C) probabilities: the mean of the views' probabilities, or
        (geometric / logits) the sigmoid of their mean logit."""
        if how == "mean":
            return sigmoid(logits).mean(0)
        if how in ("geometric", "logits"):
            return sigmoid(logits.mean(0))
        raise ValueError(f"unknown TTA merge '{how}' (mean, geometric or logits)")

    def read_predictions(self, path, ids, where: str) -> np.ndarray:
        probs = read_prediction_file(path, ids, self.columns, where)
        bad = np.argwhere((probs < 0) | (probs > 1))
        if len(bad):
            r, c = bad[0]
            raise PipelineError(
                f"{where}: {path} row {r + 2}, column '{self.columns[c]}': {probs[r, c]} is not in [0, 1]"
            )
        return probs

    def postprocess_candidates(self, metric: str) -> list[str]:
        """The fitted last steps to choose from (pipeline/postprocess.py): thresholds (global or per label,
        with or without at least one label per image) for F1 / F-beta, temperature for log loss."""
        if metric in DECISION_METRICS:
            return ["identity", *(f"thresholds{p}{o}" for p in ("", "_per_label") for o in ("", "+one"))]
        return ["identity", "temperature"] if metric == "log_loss" else ["identity"]

    def temperature(self, probs: np.ndarray, t: float) -> np.ndarray:
        """Each label's probability with its logit divided by `t`."""
        return sigmoid(logit(probs) / t)

    # ------------------------------------------------------------ the submission

    def submission_format(self, sample: pd.DataFrame, where: str, positive_class=None, metric=None) -> SubmissionFormat:
        """A tag column (the sample's delimiter where its values show one, else the task's), or one
        probability column per label; a label of train.csv missing from the columns is an error."""
        if sample.shape[1] < 2:
            raise PipelineError(f"{where}: needs an id column and at least one prediction column")
        id_col, *cols = list(sample.columns)
        if len(cols) == 1 and cols[0] not in self.classes:
            values = sample[cols[0]].astype(str)
            shown = next((d for d in (" ", ",", ";", "|") if values.str.contains(d, regex=False).any()), None)
            return SubmissionFormat(id_col, cols, "tags", delimiter=shown or self.delimiter)
        missing = [c for c in self.classes if c not in cols]
        if missing:
            raise PipelineError(
                f"{where}: label '{missing[0]}' of train.csv has no column ({len(missing)} missing; columns "
                f"{cols[:5]}...): one probability column per label, or a single tag column"
            )
        unknown = [c for c in cols if c not in self.classes]
        if unknown:
            raise PipelineError(f"{where}: column '{unknown[0]}' is not a label of train.csv")
        return SubmissionFormat(id_col, cols, "probabilities")

    def submission(self, ids: list[str], probs: np.ndarray, fmt: SubmissionFormat) -> pd.DataFrame:
        if fmt.kind == "tags":
            names = np.asarray(self.classes, dtype=object)
            decided = _decide(probs).astype(bool)
            values = {fmt.columns[0]: [fmt.delimiter.join(names[row]) for row in decided]}
        else:
            index = {c: i for i, c in enumerate(self.classes)}
            values = {c: probs[:, index[c]] for c in fmt.columns}
        frame = pd.DataFrame(values)
        frame.insert(0, fmt.id_column, ids)
        return frame

    def check_submission(self, sub: pd.DataFrame, sample: pd.DataFrame, fmt: SubmissionFormat) -> None:
        """Raise PipelineError unless `sub` has the sample's columns, ids and order, and every tag is a label
        (an image may have none) or every probability lies in [0, 1]."""
        values = check_submission_layout(sub.fillna("") if fmt.kind == "tags" else sub, sample, fmt)
        if fmt.kind == "tags":
            known = set(self.classes)
            for r, value in enumerate(values.iloc[:, 0].astype(str)):
                bad = [t for t in split_tags(value, fmt.delimiter) if t not in known]
                if bad:
                    raise PipelineError(f"submission row {r + 2}: tag '{bad[0]}' is not a label of train.csv")
            return
        p = values.to_numpy(dtype=float)
        if (p < 0).any() or (p > 1).any():
            raise PipelineError("submission probabilities must lie in [0, 1]")

    def leaderboard(self, answers: pd.DataFrame, ids: list[str], probs: np.ndarray) -> dict[str, float]:
        """Every metric against the answer file (id, tags joined by the task's delimiter)."""
        truth = answer_of(answers, ids)
        unknown = [t for i in ids for t in split_tags(truth[i], self.delimiter) if t not in self.classes]
        if unknown:
            raise PipelineError(f"answers.csv: label '{unknown[0]}' is not a label of train.csv")
        return self.scores(probs, self.encode(pd.Series([truth[i] for i in ids])))

    # ------------------------------------------------------------ the error report

    def predicted(self, probs: np.ndarray) -> np.ndarray:
        """Each row's decided labels (N, C) of 0/1."""
        return _decide(probs)

    def row_losses(self, probs: np.ndarray, y: np.ndarray, eps: float = 1e-15) -> np.ndarray:
        """Each row's BCE summed over its labels (exp(-loss): the probability of its true label set)."""
        p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
        return -(y * np.log(p) + (1 - y) * np.log(1 - p)).sum(1)

    def errors(self, pred: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Each row: is any of its labels missed or invented."""
        return (pred != y).any(1)

    def confidence(self, probs: np.ndarray) -> np.ndarray:
        """Each row's confidence in its whole label set: its least sure decision's max(p, 1 - p)."""
        return np.maximum(probs, 1 - probs).min(1)

    def calibration(self, probs: np.ndarray, pred: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(confidence, correct) of every (image, label) decision: max(p, 1 - p), and decided == true."""
        return np.maximum(probs, 1 - probs).ravel(), (pred == y).ravel()

    def confusion(self, pred: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(C, C) counts: the diagonal, each label found (true positives); cell (t, p), images where label t
        is missed while p is invented (what the model saw instead)."""
        missed, invented = (y > 0) & (pred == 0), (pred > 0) & (y == 0)
        cm = missed.T.astype(np.int64) @ invented.astype(np.int64)
        np.fill_diagonal(cm, ((pred > 0) & (y > 0)).sum(0))
        return cm

    def pair_mask(self, pred: np.ndarray, y: np.ndarray, t: int, p: int) -> np.ndarray:
        """The images of confusion cell (t, p): label t missed, p invented."""
        return (y[:, t] > 0) & (pred[:, t] == 0) & (pred[:, p] > 0) & (y[:, p] == 0)

    def predicted_counts(self, pred: np.ndarray) -> np.ndarray:
        return pred.sum(0).astype(int)

    def label_text(self, values: np.ndarray) -> list[str]:
        """Each row's labels joined by the task's delimiter ("(none)" for an empty set)."""
        names = np.asarray(self.classes, dtype=object)
        return [self.delimiter.join(names[row > 0]) or "(none)" for row in values]

    def per_class_extras(self, probs: np.ndarray, y: np.ndarray) -> dict:
        """Each label's AUC, and how many images miss it (false negatives) or invent it (false positives)."""
        pred = _decide(probs)
        auc = [roc_auc_score(y[:, c], probs[:, c]) if 0 < y[:, c].sum() < len(y) else np.nan for c in range(y.shape[1])]
        return {
            "auc": auc,
            "missed": ((y > 0) & (pred == 0)).sum(0),
            "invented": ((pred > 0) & (y == 0)).sum(0),
        }


def split_tags(value, delimiter: str) -> list[str]:
    """An image's labels: `value` split on `delimiter`, blanks dropped."""
    return [t for t in str(value).strip().split(delimiter) if t.strip()] if value == value else []
