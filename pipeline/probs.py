"""The probability files every stage after training reads and writes: `id` then one column per class,
rows in the prepared data's order (train.csv for OOF, test.csv for test).

    models/<backbone>/oof_probs.csv            train: each row by its own fold's model
    predictions/<backbone>/{oof,test}_probs.csv predict: under the chosen TTA policy
    submissions/{oof,test}_probs.csv           ensemble: the chosen method's (OOF cross-fitted)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError


def probs_frame(ids, probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """A probability file's table: `id`, then one column per class."""
    frame = pd.DataFrame(probs, columns=classes)
    frame.insert(0, "id", list(ids))
    return frame


def read_probs(path: str | Path, ids, classes: list[str], backbone: str) -> np.ndarray:
    """Probabilities from `path`, checked against the expected ids (same order) and classes."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{backbone}: {path} not found (run `dvc repro`)")
    try:
        frame = pd.read_csv(path, dtype={"id": str}, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:  # cut short or damaged
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else exc.__class__.__name__
        raise PipelineError(f"{backbone}: {path} is not a readable CSV ({reason})") from None
    if list(frame.columns[1:]) != [str(c) for c in classes]:
        raise PipelineError(f"{backbone}: {path} columns do not match the classes in classes.json")
    got, expected = frame["id"].tolist(), [str(i) for i in ids]
    if got != expected:
        row = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        found = f"id '{got[row]}'" if row < len(got) else "no row"
        want = f"'{expected[row]}'" if row < len(expected) else "no row"
        raise PipelineError(
            f"{backbone}: {path} row {row + 2}: {found} where the prepared data has {want} "
            f"({len(got)} rows, {len(expected)} expected)"
        )
    values = frame.iloc[:, 1:].apply(pd.to_numeric, errors="coerce")
    if values.isna().to_numpy().any():  # a cell cut short, empty or not a number
        row, col = np.argwhere(values.isna().to_numpy())[0]
        raise PipelineError(
            f"{backbone}: {path} row {row + 2}, column '{frame.columns[col + 1]}': "
            f"'{frame.iat[row, col + 1]}' is not a number"
        )
    probs = values.to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isclose(probs.sum(1), 1.0, atol=1e-4) | (probs < 0).any(1))
    if len(bad):
        raise PipelineError(
            f"{backbone}: {path} row {bad[0] + 2}: probabilities sum to {probs[bad[0]].sum():.6g}, "
            f"not 1 ({len(bad)} such rows)"
        )
    return probs
