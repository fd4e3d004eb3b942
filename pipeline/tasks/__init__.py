"""The kind of target as one object: everything in the pipeline that depends on what a label is.

scikit-learn's `type_of_target` names the kinds (binary, multiclass, multilabel-indicator, continuous);
here each kind is a `Task` subclass registered by name, built from the prepared data's classes.json (its
`task` and its label values). Stages and the bundle ask the task; none of them tests which kind it is.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

TASKS: dict[str, type] = {}
DEFAULT_TASK = "single_label"  # what prepare reads a competition as (competition.task comes with multi-label)


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
      from_labels(labels)           the task of train.csv's label column (its label values, ordered)
      check_labels(labels, k, where)  one-line error unless `k` folds can be drawn (e.g. a rare class)
      encode(labels) -> targets     each row's target, as the loss and the metrics take it
      stratify_on(labels)           what the folds and the holdout are stratified on
      default_sample(ids)           the submission's layout when the competition ships no sample
    The model (train, tune, plan):
      n_outputs                     the head's size
      loss(logits, y, soft, label_smoothing, class_weight)   a batch's mean loss (soft: mixed targets)
      mixup(s)                      timm's Mixup for train.mixup_alpha / cutmix_alpha, or None
      class_weight(targets, how, device), sample_weights(targets)   train.class_weight, train.sampler
      outputs(logits)               what one view of a model gives, in the space views are merged in
    Predictions (predict, ensemble, the bundle):
      merge(outputs (V, N, C), how) -> predictions (N, C)   TTA views merged (`tta.merge`)
      columns; frame(ids, predictions); read_predictions(path, ids, where)   the *_probs.csv files
    Scores (every stage that scores):
      METRICS {name: (function(predictions, targets), greater is better)}; scores(predictions, targets, names)
    The submission (prepare, ensemble, the bundle):
      submission_format(sample, where, positive_class, metric); submission(ids, predictions, fmt);
      check_submission(sub, sample, fmt); leaderboard(answers, ids, predictions)
    The error report (analyze):
      predicted(predictions) -> each row's predicted label index; row_losses(predictions, targets)
    """

    name: str
    METRICS: dict[str, tuple[Callable[[np.ndarray, np.ndarray], float], bool]] = {}

    def __init__(self, classes: list[str]):
        self.classes = [str(c) for c in classes]

    @classmethod
    def from_labels(cls, labels: pd.Series) -> "Task":  # pragma: no cover - every task overrides
        raise NotImplementedError

    @property
    def columns(self) -> list[str]:
        """The prediction files' columns after `id`."""
        return self.classes

    def scores(self, predictions: np.ndarray, targets: np.ndarray, names=None) -> dict[str, float]:
        """{name: score} for each metric in `names` (all of the task's by default)."""
        return {name: self.METRICS[name][0](predictions, targets) for name in (names or self.METRICS)}


def create_task(name: str, classes: list[str]) -> Task:
    """The task `name` of a competition with these label values."""
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}' (known: {', '.join(TASKS)})")
    return TASKS[name](classes)


def greater_is_better(metric: str) -> bool:
    """Whether a higher `metric` is better (a metric of that name means the same direction in every task)."""
    for cls in TASKS.values():
        if metric in cls.METRICS:
            return cls.METRICS[metric][1]
    raise KeyError(f"unknown metric '{metric}'")


def metric_function(task: str, metric: str) -> Callable[[np.ndarray, np.ndarray], float]:
    """`task`'s score function of `metric`: (predictions, targets) -> float."""
    functions = TASKS[task].METRICS
    if metric not in functions:
        raise ValueError(f"unknown metric '{metric}' (choose from {sorted(functions)})")
    return functions[metric][0]


from pipeline.tasks import single_label  # noqa: E402, F401  (registers the single-label task)
