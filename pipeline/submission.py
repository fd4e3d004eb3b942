"""The competition's submission file: the sample submission's layout (one label column, one
probability column per class, or a binary competition's one probability column) and the checks every
layout shares. prepare reads the layout (data/prepared/submission_format.json); the task fills it
(`Task.submission`), checks its values and scores the local leaderboard.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from pipeline.errors import PipelineError


@dataclass(frozen=True)
class SubmissionFormat:
    """The sample submission's layout: one label column ("label"), one probability column per class
    ("probabilities"), or, in a binary competition, the probability of the `positive` class ("probability")."""

    id_column: str
    columns: list[str]  # every column after the id, in order
    kind: str  # "label", "probabilities", "probability" or (multi-label) "tags"
    positive: str | None = None  # "probability": the class whose probability is submitted
    delimiter: str | None = None  # "tags": what joins an image's labels in the one column


PROBABILITY_METRICS = ("roc_auc", "log_loss")  # scored on probabilities: a hard label would throw them away


def read_submission_format(
    sample: pd.DataFrame, classes: list[str], where: str, positive_class: str | None = None, metric: str | None = None
) -> SubmissionFormat:
    """The layout of `sample`. One column in a binary competition is a probability when its values
    are fractions (0.5), when it is named after a class, when `positive_class` is set, or when the
    competition's `metric` scores probabilities; the positive class is `positive_class`, the column's
    name, or `1` / `true` / `yes`."""
    if sample.shape[1] < 2:
        raise PipelineError(f"{where}: needs an id column and at least one prediction column")
    id_col, *cols = list(sample.columns)
    if len(cols) == 1:
        if len(classes) == 2 and (
            positive_class is not None
            or cols[0] in classes
            or metric in PROBABILITY_METRICS
            or _fractions(sample[cols[0]])
        ):
            return SubmissionFormat(id_col, cols, "probability", _positive(classes, cols[0], positive_class, where))
        if positive_class is not None:
            raise PipelineError(
                f"{where}: competition.positive_class is set but the competition has {len(classes)} classes, not 2"
            )
        return SubmissionFormat(id_col, cols, "label")
    if set(cols) == set(classes):
        return SubmissionFormat(id_col, cols, "probabilities")
    unknown = sorted(set(cols) - set(classes))[:3]
    raise PipelineError(
        f"{where}: columns {unknown} are neither a single label column nor the class names of train.csv"
    )


def _fractions(values: pd.Series) -> bool:
    numbers = pd.to_numeric(values, errors="coerce")
    return bool(numbers.notna().all() and ((numbers > 0) & (numbers < 1)).any())


def _positive(classes: list[str], column: str, positive_class: str | None, where: str) -> str:
    if positive_class is not None:
        if positive_class not in classes:
            raise PipelineError(
                f"{where}: competition.positive_class '{positive_class}' is not a class of train.csv ({classes})"
            )
        return positive_class
    if column in classes:
        return column
    usual = [c for c in classes if c.strip().lower() in ("1", "1.0", "true", "yes")]
    if len(usual) == 1:
        return usual[0]
    raise PipelineError(
        f"{where}: column '{column}' holds one class's probability: set competition.positive_class to one of {classes}"
    )


def check_submission_layout(sub: pd.DataFrame, sample: pd.DataFrame, fmt: SubmissionFormat) -> pd.DataFrame:
    """Raise PipelineError unless `sub` has the sample's columns, ids and order and no empty value; returns
    its prediction columns (what the values must be is the task's: `Task.check_submission`)."""
    if list(sub.columns) != list(sample.columns):
        raise PipelineError(f"submission columns {list(sub.columns)} differ from the sample's {list(sample.columns)}")
    ids, expected = sub[fmt.id_column].astype(str).tolist(), sample[fmt.id_column].astype(str).tolist()
    if ids != expected:
        row = next((i for i, (a, b) in enumerate(zip(ids, expected)) if a != b), min(len(ids), len(expected)))
        raise PipelineError(
            f"submission row {row + 2}: ids differ from sample_submission.csv ({len(ids)} vs {len(expected)} rows)"
        )
    values = sub[fmt.columns]
    if values.isna().any().any():
        raise PipelineError("submission has empty predictions")
    return values
