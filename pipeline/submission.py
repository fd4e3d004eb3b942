"""The competition's submission file: the sample submission's layout (one label column, or one
probability column per class), filling it, checking it, and the local leaderboard score where the
competition ships test answers. prepare reads the layout; ensemble writes every submission.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError


@dataclass(frozen=True)
class SubmissionFormat:
    """The sample submission's layout: one label column, or one probability column per class."""

    id_column: str
    columns: list[str]  # every column after the id, in order
    kind: str  # "label" or "probabilities"


def read_submission_format(sample: pd.DataFrame, classes: list[str], where: str) -> SubmissionFormat:
    if sample.shape[1] < 2:
        raise PipelineError(f"{where}: needs an id column and at least one prediction column")
    id_col, *cols = list(sample.columns)
    if len(cols) == 1:
        return SubmissionFormat(id_col, cols, "label")
    if set(cols) == set(classes):
        return SubmissionFormat(id_col, cols, "probabilities")
    unknown = sorted(set(cols) - set(classes))[:3]
    raise PipelineError(
        f"{where}: columns {unknown} are neither a single label column nor the class names of train.csv"
    )



def build_submission(test_ids: list[str], probs: np.ndarray, classes: list[str], fmt: SubmissionFormat) -> pd.DataFrame:
    """The sample submission's layout filled with predictions mapped back to the original labels."""
    if fmt.kind == "label":
        values = {fmt.columns[0]: np.asarray(classes, dtype=object)[probs.argmax(1)]}
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
        raise PipelineError(f"submission row {row + 2}: ids differ from sample_submission.csv "
                            f"({len(ids)} vs {len(expected)} rows)")
    values = sub[fmt.columns]
    if values.isna().any().any():
        raise PipelineError("submission has empty predictions")
    if fmt.kind == "label":
        bad = ~values.iloc[:, 0].astype(str).isin(set(classes))
        if bad.any():
            raise PipelineError(f"submission row {int(np.flatnonzero(bad)[0]) + 2}: label is not a class of train.csv")
    else:
        p = values.to_numpy(dtype=float)
        if (p < 0).any() or (p > 1).any() or not np.allclose(p.sum(1), 1.0, atol=1e-4):
            raise PipelineError("submission probabilities must lie in [0, 1] and sum to 1 per row")


def local_leaderboard(answers: pd.DataFrame, test_ids: list[str], probs: np.ndarray, classes: list[str]) -> float:
    """Accuracy against the competition's answer file (id, label). Only reported, never fitted on."""
    id_col, label_col = answers.columns[:2]
    truth = dict(zip(answers[id_col].astype(str), answers[label_col].astype(str)))
    missing = [i for i in test_ids if i not in truth]
    if missing:
        raise PipelineError(f"answers.csv: no row for test id '{missing[0]}' ({len(missing)} missing)")
    predicted = np.asarray(classes, dtype=object)[probs.argmax(1)]
    return float(np.mean([p == truth[i] for i, p in zip(test_ids, predicted)]))
