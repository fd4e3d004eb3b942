"""A competition's training table read: its rows (train.csv or class folders), each image found, and the kind
of target its labels are (`competition.task`, or what auto finds, said in one line). The prepare stage reads
the training rows through `read_train`, and `init` reads a competition the same way to write its preset."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.competition import CompetitionFiles, ImageFolder, check_unique, inside
from pipeline.config import CompetitionConfig
from pipeline.errors import PipelineError
from pipeline.tasks import TASKS, Task
from pipeline.tasks.multilabel import split_tags


def require_columns(df: pd.DataFrame, columns: dict[str, str], where: str) -> None:
    for key, column in columns.items():
        if column not in df.columns:
            raise PipelineError(
                f"{where}: no column '{column}' (set competition.{key}); columns are {list(df.columns)}"
            )


LABEL_DELIMITERS = (" ", "|", ";", ",")  # what joins a multi-label row's labels in the prepared train.csv


def _indicators(train: pd.DataFrame, columns: list[str], where: str) -> np.ndarray:
    """The 0/1 matrix of one-column-per-label `columns`; a one-line error naming the row and column of
    any other value (a 2, a blank)."""
    values = train[columns]
    ok = values.isin(["0", "1", "0.0", "1.0"]).to_numpy()
    if not ok.all():
        r, c = np.argwhere(~ok)[0]
        raise PipelineError(
            f"{where}: row {r + 2}, column '{columns[c]}': '{values.iat[r, c]}' is not 0 or 1 "
            f"(one 0/1 column per label)"
        )
    return values.astype(float).astype(int).to_numpy()


def _indicator_columns(train: pd.DataFrame, comp: CompetitionConfig) -> list[str] | None:
    """The one-column-per-label layout's columns: `label_column` as a list, or, with the default
    label_column absent from train.csv, every column but the id, group and path ones when all hold 0/1."""
    if isinstance(comp.label_column, list):
        return list(comp.label_column)
    if comp.label_column in train.columns or comp.label_column != CompetitionConfig.label_column:
        return None
    other = [c for c in train.columns if c not in ("id", "group", comp.path_column)]
    if other and train[other].isin(["0", "1", "0.0", "1.0"]).all().all():
        return other
    return None


def read_target(train: pd.DataFrame, comp: CompetitionConfig, where: str) -> tuple[Task, pd.DataFrame]:
    """The kind of target (`competition.task`, or what auto finds, said in one line) and the rows with
    each one's `label` as that task reads it (a multi-label row: its labels joined by the task's delimiter)."""
    columns = _indicator_columns(train, comp)
    if columns is not None:
        for c in columns:
            require_columns(train, {"label_column": c}, where)
        values = _indicators(train, columns, where)
        one_each = bool((values.sum(1) == 1).all())
        kind, why = comp.task, f"{len(columns)} 0/1 label columns"
        if kind == "auto":
            kind = "single_label" if one_each else "multilabel"
            why += ", exactly one 1 in every row" if one_each else ", rows with several 1s"
        if kind == "single_label":
            bad = np.flatnonzero(values.sum(1) != 1)
            if len(bad):
                raise PipelineError(
                    f"{where}: row {bad[0] + 2} has {values[bad[0]].sum()} labels set, not one "
                    f"(competition.task: single_label; multilabel reads several)"
                )
            labels = np.asarray(columns, dtype=object)[np.nonzero(values)[1]]  # the one 1 of each row, in row order
            task = TASKS["single_label"].from_labels(pd.Series(labels))
        else:
            delimiter = next((d for d in LABEL_DELIMITERS if not any(d in c for c in columns)), None)
            if delimiter is None:
                raise PipelineError(f"{where}: every label column name holds one of {LABEL_DELIMITERS}")
            names = np.asarray(columns, dtype=object)
            labels = [delimiter.join(names[row.astype(bool)]) for row in values]
            task = TASKS["multilabel"](columns, delimiter, comp.beta)
        train = train.drop(columns=[c for c in columns if c != "label"]).assign(label=labels)
    else:
        require_columns(train, {"label_column": comp.label_column}, where)
        train = train.rename(columns={comp.label_column: "label"})
        kind, why = _tag_reading(train["label"], comp, where)
        if kind == "single_label":
            task = TASKS["single_label"].from_labels(train["label"])
        elif kind == "regression":
            task = TASKS["regression"].from_labels(train["label"], where)
        else:
            task = TASKS["multilabel"].from_labels(train["label"], comp.label_delimiter, comp.beta)
            train["label"] = [task.delimiter.join(split_tags(v, comp.label_delimiter)) for v in train["label"]]
    print(f"task: {task.name} ({'competition.task' if comp.task != 'auto' else 'auto'}: {why})")
    _check_labels(train, task, comp, where)
    return task, train


MAX_AUTO_CLASSES = 20  # auto: a numeric label column with more distinct integers than this is a regression


def _tag_reading(labels: pd.Series, comp: CompetitionConfig, where: str) -> tuple[str, str]:
    """One label column: single-label, multi-label tags joined by `competition.label_delimiter`, or a
    regression. Auto reads a numeric column as a regression when it holds non-integers or more than
    MAX_AUTO_CLASSES distinct integers (a score); reads tags when some rows hold several and the distinct
    tags are fewer than the distinct values (values are combinations of shared tags); a single value per row
    (integer classes, grades) is single-label; delimited values that share no tags are two readings: an
    error naming the key."""
    d = comp.label_delimiter
    several = labels.map(lambda v: len(split_tags(v, d)) > 1)
    column = f"column '{comp.label_column}'"
    if comp.task != "auto":
        return comp.task, f"{column}" + (f", labels joined by {d!r}" if comp.task == "multilabel" else "")
    numbers = pd.to_numeric(labels, errors="coerce")
    if numbers.notna().all():
        distinct = numbers.nunique()
        if not np.allclose(numbers, np.round(numbers)) or distinct > MAX_AUTO_CLASSES:
            reason = "non-integer values" if distinct <= MAX_AUTO_CLASSES else f"{distinct} distinct integers"
            return "regression", f"numbers in {column} ({reason}; integer classes have at most {MAX_AUTO_CLASSES})"
    if not several.any():
        return "single_label", f"one value per row in {column}"
    tags = {t for v in labels for t in split_tags(v, d)}
    values = set(labels)
    if len(tags) < len(values):
        return "multilabel", (
            f"{int(several.sum())} of {len(labels)} rows of {column} hold several of {len(tags)} labels joined by {d!r}"
        )
    example = labels[several].iloc[0]
    raise PipelineError(
        f"{where}: {column} reads two ways: single-label ({len(values)} classes such as '{example}') or "
        f"multi-label ({len(tags)} tags joined by {d!r}); set competition.task: single_label or multilabel"
    )


def _check_labels(train: pd.DataFrame, task: Task, comp: CompetitionConfig, where: str) -> None:
    """Empty and missing-value labels: an error naming the row (a multi-label row may have no label with
    `competition.empty_labels: true`)."""
    empty = train.index[train["label"] == ""]
    if len(empty) and not (task.name == "multilabel" and comp.empty_labels):
        hint = " (competition.empty_labels: true allows images without labels)" if task.name == "multilabel" else ""
        raise PipelineError(f"{where}: row {int(empty[0]) + 2}: empty label{hint}")
    missing = train.index[train["label"].isin(MISSING_LABELS)]
    if len(missing):
        row = int(missing[0])
        raise PipelineError(
            f"{where}: row {row + 2}: label '{train['label'][row]}' marks a missing value, "
            f"not a class ({len(missing)} such rows)"
        )


# what pandas and spreadsheets write for a missing value: a label like these is an unlabelled row, not a class
MISSING_LABELS = frozenset(
    {
        "#N/A",
        "#N/A N/A",
        "#NA",
        "-1.#IND",
        "-1.#QNAN",
        "-NaN",
        "-nan",
        "1.#IND",
        "1.#QNAN",
        "<NA>",
        "N/A",
        "NA",
        "NULL",
        "NaN",
        "None",
        "n/a",
        "nan",
        "null",
    }
)


def read_train(files: CompetitionFiles, comp: CompetitionConfig) -> tuple[pd.DataFrame, Task]:
    """The training rows: id, label, path (the image's path inside the competition, None if no image
    matches)[, group], from train.csv or, with `train_csv: null`, from train_dir/<class>/<file>; and the
    kind of target they are read as."""
    if comp.train_csv is None:
        folder = ImageFolder(files, comp.train_dir, comp.image_ext)
        loose = [p for p in folder.paths if "/" not in p]
        if loose:
            raise PipelineError(
                f"{files.where(folder.rel(loose[0]))}: not inside a class folder "
                f"(competition.train_csv: null reads {comp.train_dir}/<class>/<file>)"
            )
        paths = sorted(folder.paths)
        if not paths:
            raise PipelineError(f"{files.where(comp.train_dir)}: no images in class folders")
        rels = [folder.rel(p) for p in paths]
        if comp.task not in ("auto", "single_label"):
            raise PipelineError(
                f"competition.task: {comp.task} needs a train.csv (train_csv: null reads class folders)"
            )
        train = pd.DataFrame(
            {"id": paths, "label": [p.split("/", 1)[0] for p in paths], "path": rels, "expected": rels}
        )
        return train, TASKS["single_label"].from_labels(train["label"])
    train_where = files.where(comp.train_csv)
    train = files.read_csv(comp.train_csv)
    needed = {"id_column": comp.id_column}
    for key in ("group_column", "path_column"):
        if getattr(comp, key):
            needed[key] = getattr(comp, key)
    require_columns(train, needed, train_where)
    train = train.rename(columns={comp.id_column: "id", **({comp.group_column: "group"} if comp.group_column else {})})
    if len(train) == 0:
        raise PipelineError(f"{train_where}: no rows")
    empty = train.index[train["id"] == ""]
    if len(empty):
        raise PipelineError(f"{train_where}: empty id in row {int(empty[0]) + 2}")
    task, train = read_target(train, comp, train_where)
    check_unique(train["id"], train_where)
    folder = ImageFolder(files, comp.train_dir, comp.image_ext)
    names = train[comp.path_column] if comp.path_column else train["id"]
    found = [folder.find(v, f"{train_where} row {i + 2}") for i, v in enumerate(names)]
    train["path"] = [folder.rel(p) if p else None for p in found]
    train["expected"] = [folder.rel(inside(v, "") + comp.image_ext) for v in names]  # named if missing
    return train, task
