"""The competition's submission file: the sample submission's layout (one label column, one
probability column per class, or a binary competition's one probability column), filling it,
checking it, and the local leaderboard score where the competition ships test answers. prepare
reads the layout (data/prepared/submission_format.json); ensemble writes every submission.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.metrics import scores


@dataclass(frozen=True)
class SubmissionFormat:
    """The sample submission's layout: one label column ("label"), one probability column per class
    ("probabilities"), or, in a binary competition, the probability of the `positive` class ("probability")."""

    id_column: str
    columns: list[str]  # every column after the id, in order
    kind: str  # "label", "probabilities" or "probability"
    positive: str | None = None  # "probability": the class whose probability is submitted


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


def build_submission(test_ids: list[str], probs: np.ndarray, classes: list[str], fmt: SubmissionFormat) -> pd.DataFrame:
    """The sample submission's layout filled with predictions mapped back to the original labels."""
    if fmt.kind == "label":
        values = {fmt.columns[0]: np.asarray(classes, dtype=object)[probs.argmax(1)]}
    elif fmt.kind == "probability":
        values = {fmt.columns[0]: probs[:, classes.index(fmt.positive)]}
    else:
        index = {c: i for i, c in enumerate(classes)}
        values = {c: probs[:, index[c]] for c in fmt.columns}
    frame = pd.DataFrame(values)
    frame.insert(0, fmt.id_column, test_ids)
    return frame


def validate_submission(sub: pd.DataFrame, sample: pd.DataFrame, classes: list[str], fmt: SubmissionFormat) -> None:
    """Raise PipelineError unless `sub` has the sample's columns, ids and order, and valid values."""
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
    if fmt.kind == "label":
        bad = ~values.iloc[:, 0].astype(str).isin(set(classes))
        if bad.any():
            raise PipelineError(f"submission row {int(np.flatnonzero(bad)[0]) + 2}: label is not a class of train.csv")
    else:
        p = values.to_numpy(dtype=float)
        if (
            (p < 0).any()
            or (p > 1).any()
            or (fmt.kind == "probabilities" and not np.allclose(p.sum(1), 1.0, atol=1e-4))
        ):
            raise PipelineError("submission probabilities must lie in [0, 1] and sum to 1 per row")


def local_leaderboard(
    answers: pd.DataFrame, test_ids: list[str], probs: np.ndarray, classes: list[str]
) -> dict[str, float]:
    """Every metric against the competition's answer file (id, label). Only reported, never fitted on."""
    id_col, label_col = answers.columns[:2]
    truth = dict(zip(answers[id_col].astype(str), answers[label_col].astype(str)))
    missing = [i for i in test_ids if i not in truth]
    if missing:
        raise PipelineError(f"answers.csv: no row for test id '{missing[0]}' ({len(missing)} missing)")
    index = {c: k for k, c in enumerate(classes)}
    unknown = [truth[i] for i in test_ids if truth[i] not in index]
    if unknown:
        raise PipelineError(f"answers.csv: label '{unknown[0]}' is not a class of train.csv")
    return scores(probs, np.array([index[truth[i]] for i in test_ids]))
