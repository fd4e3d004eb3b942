"""The kind of target as one object: everything in the pipeline that depends on what a label is.

scikit-learn's `type_of_target` names the kinds (binary, multiclass, multilabel-indicator, continuous);
here each kind is a `Task` subclass registered by name, built from the prepared data's classes.json (its
`task` and its label values). Stages and the bundle ask the task; none of them tests which kind it is.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

from pipeline.config import ConfigError
from pipeline.errors import PipelineError
from pipeline.probs import prediction_frame

TASKS: dict[str, type] = {}
DEFAULT_TASK = "single_label"  # a prepared folder's task when its classes.json names none (before multi-label)


def register_task(name: str):
    """Class decorator: a kind of target, chosen by name (classes.json's `task`)."""

    def wrap(cls):
        cls.name = name
        TASKS[name] = cls
        return cls

    return wrap


class Task:
    """What a new kind of target implements (each method's single-label version: tasks/single_label.py).

    Reading the labels (prepare):
      from_labels(labels, **options)  the task of train.csv's label column (its label values, ordered)
      options                       what else classes.json stores to rebuild the task (e.g. a delimiter)
      check_labels(labels, k, where)  one-line error unless `k` folds can be drawn (e.g. a rare class)
      encode(labels) -> targets     each row's target, as the loss and the metrics take it
      stratify_on(labels); split(stratify, k, seed, groups); holdout_rows(stratify, share, seed, groups)
                                    the folds and `cv.holdout`, stratified as the task's targets need
      default_sample(ids)           the submission's layout when the competition ships no sample
    The model (train, tune, plan):
      n_outputs                     the head's size
      check_settings(s, where)      a ConfigError naming a train setting the task does not define
      fit_target(targets, s) -> the task as a fold trains it (a regression's scaling, from its training rows);
      target_state; for_model(ckpt) what the checkpoint stores of it, and the task as that model predicts
      loss(logits, y, soft, label_smoothing, class_weight)   a batch's mean loss (soft: mixed targets)
      mixup(s)                      timm's Mixup for train.mixup_alpha / cutmix_alpha, or None
      class_weight(targets, how, device), sample_weights(targets)   train.class_weight, train.sampler
      outputs(logits)               what one view of a model gives, in the space views are merged in
    Predictions (predict, ensemble, the bundle):
      merge(outputs (V, N, C), how) -> predictions (N, C)   TTA views merged (`tta.merge`)
      columns; frame(ids, predictions); read_predictions(path, ids, where)   the *_probs.csv files
    Scores (every stage that scores):
      METRICS {name: (function(predictions, targets), greater is better)}; bind(name) -> that function with
      the task's options (f_beta's beta); scores(predictions, targets, names)
    Fitted last steps (ensemble, pipeline/postprocess.py):
      postprocess_candidates(metric) -> the candidate steps' names; temperature(predictions, t)
    Ensembles: ENSEMBLE_METHODS, the `ensemble.methods` defined for the task
    The submission (prepare, ensemble, the bundle):
      submission_format(sample, where, positive_class, metric); submission(ids, predictions, fmt);
      check_submission(sub, sample, fmt); leaderboard(answers, ids, predictions)
    The error report (analyze):
      predicted(predictions) -> each row's decision; row_losses(predictions, targets); errors(pred, targets);
      confidence(predictions); calibration(predictions, pred, targets); confusion(pred, targets);
      pair_mask(pred, targets, t, p); predicted_counts(pred); label_text(values); per_class_extras(...)
    """

    name: str
    METRICS: dict[str, tuple[Callable[[np.ndarray, np.ndarray], float], bool]] = {}
    ENSEMBLE_METHODS: tuple[str, ...] = ()
    MULTI_HOT = False  # targets are class indices, one-hot encoded by mixup
    PROXY = "log_loss"  # the smooth metric reports show beside the competition's (a regression's: rmse)
    CALIBRATION = ("confidence (max probability)", "accuracy")  # the reliability diagram's axes
    HAS_CONFIDENCE = True  # predictions state a confidence (the report's "confident and wrong" gallery)
    NEVER_PREDICTED_HINT = "try train.class_weight: balanced"  # a class with rows the model never predicts
    CLASS_WORD = "class"  # what the report calls one row of its per-class table (a label, a slice of the target)

    def __init__(self, classes: list[str]):
        self.classes = [str(c) for c in classes]

    @property
    def options(self) -> dict:
        """The constructor's arguments beyond the classes (classes.json stores them)."""
        return {}

    def bind(self, name: str) -> Callable[[np.ndarray, np.ndarray], float]:
        """The score function of metric `name` with this task's options."""
        if name not in self.METRICS:
            raise ValueError(
                f"metric '{name}' is not defined for a {self.name} task (choose from {sorted(self.METRICS)})"
            )
        return self.METRICS[name][0]

    def check_settings(self, s, where: str) -> None:
        """Raise ConfigError naming a train setting (of `s`) the task does not define."""

    def fit_target(self, targets: np.ndarray, s) -> "Task":
        """The task as a fold trains it, with what it fits on the fold's training `targets` (a regression's
        scaling); the classification tasks fit nothing."""
        return self

    def for_model(self, ckpt: dict) -> "Task":
        """The task as a fold model predicts, with what its checkpoint's `target_scale` holds."""
        return self

    @property
    def target_state(self) -> dict | None:
        """What `fit_target` fitted, as the checkpoint's `target_scale` stores it."""
        return None

    @classmethod
    def from_labels(cls, labels: pd.Series) -> "Task":  # pragma: no cover - every task overrides
        raise NotImplementedError

    @property
    def columns(self) -> list[str]:
        """The prediction files' columns after `id`."""
        return self.classes

    @property
    def n_outputs(self) -> int:
        """The head's size: one output per class (label)."""
        return len(self.classes)

    def mixup(self, s):
        """timm's Mixup (with its label smoothing) for `s.mixup_alpha` / `s.cutmix_alpha`, or None."""
        from timm.data import Mixup

        if not (s.mixup_alpha > 0 or s.cutmix_alpha > 0):
            return None
        return Mixup(
            mixup_alpha=s.mixup_alpha,
            cutmix_alpha=s.cutmix_alpha,
            label_smoothing=s.label_smoothing,
            num_classes=self.n_outputs,
            **({"multi_label": True} if self.MULTI_HOT else {}),  # dense targets mixed as they are (timm >= 1.0.2x)
        )

    def frame(self, ids, predictions: np.ndarray) -> pd.DataFrame:
        """A prediction file's table: `id`, then the task's columns."""
        return prediction_frame(ids, predictions, self.columns)

    def pair_strength(self, predictions: np.ndarray, losses: np.ndarray, rows: np.ndarray, p: int) -> np.ndarray:
        """How strongly each of a confusion cell's `rows` was predicted as `p` (its examples, strongest first)."""
        return predictions[rows, p]

    def describe(self) -> str:
        """The target in a few words, for prepare's summary line."""
        return f"{len(self.classes)} classes"

    def truth(self, y: np.ndarray) -> np.ndarray:
        """What the report's class-wise tables compare a row's `predicted` class with: its target's class."""
        return y

    def scores(self, predictions: np.ndarray, targets: np.ndarray, names=None) -> dict[str, float]:
        """{name: score} for each metric in `names` (all of the task's by default)."""
        return {name: self.bind(name)(predictions, targets) for name in (names or self.METRICS)}


def answer_of(answers: pd.DataFrame, ids: list[str]) -> dict[str, str]:
    """{id: its answer} from the competition's answer file (id, then the answer), every test id present."""
    id_col, label_col = answers.columns[:2]
    truth = dict(zip(answers[id_col].astype(str), answers[label_col].astype(str)))
    missing = [i for i in ids if i not in truth]
    if missing:
        raise PipelineError(f"answers.csv: no row for test id '{missing[0]}' ({len(missing)} missing)")
    return truth


def create_task(name: str, classes: list[str], **options) -> Task:
    """The task `name` of a competition with these label values (and its options, classes.json's)."""
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}' (known: {', '.join(TASKS)})")
    return TASKS[name](classes, **options)


def greater_is_better(metric: str) -> bool:
    """Whether a higher `metric` is better (a metric of that name means the same direction in every task)."""
    for cls in TASKS.values():
        if metric in cls.METRICS:
            return cls.METRICS[metric][1]
    raise KeyError(f"unknown metric '{metric}'")


def check_params(params, task: Task, where: str, monitor: str | None = None) -> None:
    """Raise ConfigError naming the key where params.yaml names a metric or an ensemble method the task does
    not define (`monitor`: a backbone's resolved train.monitor); the train and tune stages call it before any
    work, so a multi-label run does not learn at its end that `ensemble.methods` lists hard_voting."""
    keys = {
        "competition.metric": params.competition.metric,
        "train.monitor": monitor or params.train.monitor,
        "tune.metric": params.tune.metric,
        "tta.metric": params.tta.metric,
        "ensemble.metric": params.ensemble.metric,
    }
    for key, metric in keys.items():
        if metric not in task.METRICS and metric in type(task).METRICS:  # dropped for this target's values
            raise ConfigError(
                f"{where}: {key}: {metric} needs ordered labels, integer grades "
                f"(this competition's: {', '.join(task.classes[:3])}, ...)"
            )
        if metric not in task.METRICS:
            raise ConfigError(
                f"{where}: {key}: {metric} is not a {task.name} metric (choose from {', '.join(task.METRICS)})"
            )
    for m in [*params.ensemble.methods, params.ensemble.method]:
        if m != "auto" and m not in task.ENSEMBLE_METHODS:
            raise ConfigError(
                f"{where}: ensemble.methods: {m} is not defined for a {task.name} task "
                f"(defined: {', '.join(task.ENSEMBLE_METHODS)})"
            )


def metric_function(task: str, metric: str, options: dict | None = None) -> Callable[[np.ndarray, np.ndarray], float]:
    """`task`'s score function of `metric` with the task's `options`: (predictions, targets) -> float."""
    return TASKS[task]([], **(options or {})).bind(metric)


from pipeline.tasks import multilabel, regression, single_label  # noqa: E402, F401  (registers the tasks)


def assign_folds(
    task: Task, stratify: np.ndarray, n_folds: int, seed: int, groups: np.ndarray | None = None
) -> np.ndarray:
    """Each row's fold index, stratified as the task splits (group-aware with groups)."""
    fold = np.full(len(stratify), -1, dtype=np.int64)
    for k, (_, val_idx) in enumerate(task.split(stratify, n_folds, seed, groups)):
        fold[val_idx] = k
    return fold
