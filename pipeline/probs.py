"""The prediction files every stage after training reads and writes: `id`, then the task's columns (for a
single-label task one probability per class), rows in the prepared data's order (train.csv for OOF,
test.csv for test). What the values must satisfy is the task's (`Task.read_predictions`).

    models/<backbone>/oof_probs.csv            train: each row by its own fold's model
    predictions/<backbone>/{oof,test}_probs.csv predict: under the chosen TTA policy
    submissions/{oof,test}_probs.csv           ensemble: the chosen method's (OOF cross-fitted)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError


def prediction_frame(ids, values: np.ndarray, columns: list[str]) -> pd.DataFrame:
    """A prediction file's table: `id`, then one column per entry of `columns`."""
    frame = pd.DataFrame(values, columns=columns)
    frame.insert(0, "id", list(ids))
    return frame


def read_prediction_file(path: str | Path, ids, columns: list[str], where: str) -> np.ndarray:
    """The numbers of `path`, checked against the expected ids (same order) and columns; a one-line
    PipelineError (starting with `where`) naming the file, row and column of what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{where}: {path} not found (run `dvc repro`)")
    try:
        frame = pd.read_csv(path, dtype={"id": str}, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:  # cut short or damaged
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else exc.__class__.__name__
        raise PipelineError(f"{where}: {path} is not a readable CSV ({reason})") from None
    if list(frame.columns[1:]) != [str(c) for c in columns]:
        raise PipelineError(f"{where}: {path} columns do not match the classes in classes.json")
    got, expected = frame["id"].tolist(), [str(i) for i in ids]
    if got != expected:
        row = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        found = f"id '{got[row]}'" if row < len(got) else "no row"
        want = f"'{expected[row]}'" if row < len(expected) else "no row"
        raise PipelineError(
            f"{where}: {path} row {row + 2}: {found} where the prepared data has {want} "
            f"({len(got)} rows, {len(expected)} expected)"
        )
    values = frame.iloc[:, 1:].apply(pd.to_numeric, errors="coerce")
    if values.isna().to_numpy().any():  # a cell cut short, empty or not a number
        row, col = np.argwhere(values.isna().to_numpy())[0]
        raise PipelineError(
            f"{where}: {path} row {row + 2}, column '{frame.columns[col + 1]}': "
            f"'{frame.iat[row, col + 1]}' is not a number"
        )
    return values.to_numpy(dtype=np.float64)
