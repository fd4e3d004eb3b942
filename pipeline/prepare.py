"""`prepare` stage: raw competition files -> validated tables, folds, an image cache and stats.

    python -m pipeline prepare            # reads params.yaml, writes data/prepared/

Outputs (data/prepared/):
  train.csv          id, label (original value), target (class index), fold, width, height, path[, group]
  test.csv           id, width, height, path, in the sample submission's order (width, height: the original
                     size; path: the image inside the competition)
  classes.json       the original label values, in class-index order, and the task (the kind of target)
  submission_format.json  the sample submission's layout (label, probabilities, or one binary probability)
  train_images.npy   uint8 (N, S, S, 3), rows aligned with train.csv (S = prepare.image_size; written as
                     decoded, so memory holds a chunk, not the cache)
  test_images.npy    uint8 (M, S, S, 3), rows aligned with test.csv
  stats.json         per-channel mean/std (0-1 scale) of all train images and of each fold's training part
  holdout.csv, holdout_images.npy   with `cv.holdout`: the rows kept out of every fold (id, label, target,
                     width, height, path[, group]), never in train.csv: scored only as the test set is predicted
  sample_submission.csv, answers.csv (if the competition ships test labels)
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from pipeline.cache import channel_stats, decode_images, keep_rows
from pipeline.competition import (
    CompetitionFiles,
    ImageFolder,
    check_unique,
    find_test_images,
    inside,
    open_competition,
)
from pipeline.config import CompetitionConfig
from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, write_json
from pipeline.submission import SubmissionFormat
from pipeline.tasks import DEFAULT_TASK, TASKS, Task

DIGITS_MARKER = "SKLEARN_DIGITS"  # in a source folder: render scikit-learn's digits there


# ---------------------------------------------------------------- raw files: a folder or a zip


# ---------------------------------------------------------------- the embedded default competition


def render_digits(out_dir: str | Path, test_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write scikit-learn's bundled digits as a Kaggle competition (PNG images) into `out_dir`,
    keeping its DIGITS_MARKER file (the folder is the prepare stage's tracked source).

    80% train / 20% test, stratified; test labels go to `solution.csv`, as Kaggle keeps them.
    """
    from sklearn.datasets import load_digits

    out_dir = Path(out_dir)
    if (out_dir / "sample_submission.csv").exists():
        return out_dir
    digits = load_digits()
    ids = np.arange(len(digits.target))
    train_ids, test_ids = train_test_split(ids, test_size=test_fraction, stratify=digits.target, random_state=seed)
    marker = (out_dir / DIGITS_MARKER).read_text() if (out_dir / DIGITS_MARKER).exists() else ""
    with atomic_dir(out_dir) as tmp:
        (tmp / DIGITS_MARKER).write_text(marker)
        for split, split_ids in (("train", train_ids), ("test", test_ids)):
            (tmp / split).mkdir()
            for i in split_ids:
                pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(tmp / split / f"{i}.png")
        pd.DataFrame({"id": np.sort(train_ids), "label": digits.target[np.sort(train_ids)]}).to_csv(
            tmp / "train.csv", index=False
        )
        test_sorted = np.sort(test_ids)
        pd.DataFrame({"id": test_sorted, "label": 0}).to_csv(tmp / "sample_submission.csv", index=False)
        pd.DataFrame({"id": test_sorted, "label": digits.target[test_sorted]}).to_csv(tmp / "solution.csv", index=False)
    return out_dir


# ---------------------------------------------------------------- validation helpers


def _require_columns(df: pd.DataFrame, columns: dict[str, str], where: str) -> None:
    for key, column in columns.items():
        if column not in df.columns:
            raise PipelineError(
                f"{where}: no column '{column}' (set competition.{key}); columns are {list(df.columns)}"
            )


def _kind() -> type[Task]:
    """The kind of target prepare reads train.csv's labels as (`competition.task` arrives with multi-label)."""
    return TASKS[DEFAULT_TASK]


def holdout_mask(labels: np.ndarray, share: float, seed: int, groups: np.ndarray | None, where: str) -> np.ndarray:
    """`cv.holdout`: a stratified `share` of the rows (True), kept out of every fold; with groups, one part
    of a StratifiedGroupKFold split into round(1 / share) parts, so no group is on both sides."""
    mask = np.zeros(len(labels), dtype=bool)
    try:
        if groups is None:
            _, idx = train_test_split(np.arange(len(labels)), test_size=share, stratify=labels, random_state=seed)
        else:
            splitter = StratifiedGroupKFold(n_splits=max(2, round(1 / share)), shuffle=True, random_state=seed)
            _, idx = next(splitter.split(np.zeros(len(labels)), labels, groups))
    except ValueError as exc:
        raise PipelineError(f"{where}: cv.holdout={share} cannot be drawn stratified: {exc}") from None
    mask[idx] = True
    return mask


def assign_folds(labels: np.ndarray, n_folds: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Stratified fold index per row (StratifiedGroupKFold when groups are given)."""
    fold = np.full(len(labels), -1, dtype=np.int64)
    if groups is None:
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(len(labels)), labels)
    else:
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(len(labels)), labels, groups)
    for k, (_, val_idx) in enumerate(splits):
        fold[val_idx] = k
    return fold


# ---------------------------------------------------------------- image cache


def _bad_list(files: CompetitionFiles, rels: list[str], bad: dict[int, str], limit: int = 10) -> str:
    shown = [f"{files.where(rels[i]) if rels[i] else i} ({why})" for i, why in sorted(bad.items())[:limit]]
    return "; ".join(shown) + (f"; and {len(bad) - limit} more" if len(bad) > limit else "")


# ---------------------------------------------------------------- the stage


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


def _read_train(files: CompetitionFiles, comp: CompetitionConfig) -> pd.DataFrame:
    """The training rows: id, label, path (the image's path inside the competition, None if no image
    matches)[, group], from train.csv or, with `train_csv: null`, from train_dir/<class>/<file>."""
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
        return pd.DataFrame({"id": paths, "label": [p.split("/", 1)[0] for p in paths], "path": rels, "expected": rels})
    train_where = files.where(comp.train_csv)
    train = files.read_csv(comp.train_csv)
    needed = {"id_column": comp.id_column, "label_column": comp.label_column}
    for key in ("group_column", "path_column"):
        if getattr(comp, key):
            needed[key] = getattr(comp, key)
    _require_columns(train, needed, train_where)
    train = train.rename(
        columns={
            comp.id_column: "id",
            comp.label_column: "label",
            **({comp.group_column: "group"} if comp.group_column else {}),
        }
    )
    if len(train) == 0:
        raise PipelineError(f"{train_where}: no rows")
    empty = train.index[(train["id"] == "") | (train["label"] == "")]
    if len(empty):
        raise PipelineError(f"{train_where}: empty id or label in row {int(empty[0]) + 2}")
    missing = train.index[train["label"].isin(MISSING_LABELS)]
    if len(missing):
        row = int(missing[0])
        raise PipelineError(
            f"{train_where}: row {row + 2}: label '{train['label'][row]}' marks a missing value, "
            f"not a class ({len(missing)} such rows)"
        )
    check_unique(train["id"], train_where)
    folder = ImageFolder(files, comp.train_dir, comp.image_ext)
    names = train[comp.path_column] if comp.path_column else train["id"]
    found = [folder.find(v, f"{train_where} row {i + 2}") for i, v in enumerate(names)]
    train["path"] = [folder.rel(p) if p else None for p in found]
    train["expected"] = [folder.rel(inside(v, "") + comp.image_ext) for v in names]  # named if missing
    return train


def _add_targets_and_folds(
    train: pd.DataFrame, task: Task, comp: CompetitionConfig, n_folds: int, seed: int
) -> pd.DataFrame:
    train = train.reset_index(drop=True)
    train["target"] = task.encode(train["label"])
    groups = train["group"].to_numpy() if comp.group_column else None
    train["fold"] = assign_folds(task.stratify_on(train["target"].to_numpy()), n_folds, seed, groups)
    return train


def _split_holdout(
    d: _Decoded,
    tmp: Path,
    task: Task,
    comp: CompetitionConfig,
    share: float,
    n_folds: int,
    seed: int,
    where: str,
) -> pd.DataFrame:
    """Move `cv.holdout`'s rows out of the decoded training rows and their image cache into
    holdout_images.npy; returns their table (id, label, target, width, height, path[, group])."""
    train = d.train.reset_index(drop=True)
    groups = train["group"].to_numpy() if comp.group_column else None
    mask = holdout_mask(task.stratify_on(train["label"].to_numpy()), share, seed, groups, where)
    keep, held = np.flatnonzero(~mask), np.flatnonzero(mask)
    keep_rows(tmp / "train_images.npy", held, dest=tmp / "holdout_images.npy")
    keep_rows(tmp / "train_images.npy", keep)
    holdout = train.iloc[held].reset_index(drop=True)
    holdout["target"] = task.encode(holdout["label"])
    holdout["width"], holdout["height"] = d.train_sizes[held, 0], d.train_sizes[held, 1]
    d.train, d.train_sizes, d.sums, d.squares = train.iloc[keep], d.train_sizes[keep], d.sums[keep], d.squares[keep]
    _kind().check_labels(d.train["label"], n_folds, f"{where} (after cv.holdout={share})")
    cols = ["id", "label", "target", "width", "height", "path"] + (["group"] if comp.group_column else [])
    return holdout[cols]


def _read_test(files: CompetitionFiles, comp: CompetitionConfig, task: Task, train_paths: set[str]):
    """(sample submission, its format, test ids, each id's image path inside the competition): the
    sample lists the test images; with `sample_submission: null`, every image under test_dir.
    Training images (`train_paths`) in the same folder are not test images."""
    folder = ImageFolder(files, comp.test_dir, comp.image_ext, exclude=train_paths)
    if comp.sample_submission is None:
        ids, found = find_test_images(folder, None, "")
        sample = task.default_sample(ids)
        fmt = task.submission_format(sample, "competition.sample_submission: null")
        return sample, fmt, ids, [folder.rel(p) for p in found]
    sample_where = files.where(comp.sample_submission)
    sample = files.read_csv(comp.sample_submission)
    fmt = task.submission_format(sample, sample_where, comp.positive_class, comp.metric)
    test_ids, found = find_test_images(folder, sample[fmt.id_column].tolist(), sample_where)
    return sample, fmt, test_ids, [folder.rel(p) for p in found]


def _digits_source(source: Path) -> bool:
    """A folder holding the DIGITS_MARKER file is where the embedded digits competition is rendered."""
    return source.is_dir() and (source / DIGITS_MARKER).exists()


def _read_answers(files: CompetitionFiles, comp: CompetitionConfig, id_column: str) -> pd.DataFrame | None:
    """The test labels, where the competition has them (a local leaderboard, never used to choose)."""
    if not (comp.answers and files.exists(comp.answers)):
        return None
    answers = files.read_csv(comp.answers)
    _require_columns(answers, {"id_column": id_column}, files.where(comp.answers))
    return answers


@dataclasses.dataclass
class _TestSide:
    """The test half of a competition as prepare reads it."""

    sample: pd.DataFrame  # the sample submission
    fmt: SubmissionFormat
    ids: list[str]
    paths: list[str | None]  # each id's image inside the competition
    answers: pd.DataFrame | None  # the test labels where the competition has them (a local leaderboard)


@dataclasses.dataclass
class _Decoded:
    """The training rows whose images decoded, their original sizes and pixel sums, and the test sizes."""

    train: pd.DataFrame
    train_sizes: np.ndarray
    sums: np.ndarray
    squares: np.ndarray
    test_sizes: np.ndarray
    skipped: int  # bad training images dropped (prepare.skip_bad_images)
    holdout: pd.DataFrame | None = None  # cv.holdout's rows, out of `train` (their images: holdout_images.npy)


def _read_rows(
    files: CompetitionFiles, comp: CompetitionConfig, n_folds: int, seed: int
) -> tuple[pd.DataFrame, str, set[str]]:
    """The training rows (subsampled to `competition.max_train_rows`), checked; where they come from;
    and every training image path, before any subsample (none of them is a test image)."""
    where = files.where(comp.train_csv or comp.train_dir)
    train = _read_train(files, comp)
    paths = {p for p in train["path"] if isinstance(p, str)}
    _kind().check_labels(train["label"], n_folds, where)
    if comp.max_train_rows is not None and comp.max_train_rows < len(train):
        train, _ = train_test_split(train, train_size=comp.max_train_rows, stratify=train["label"], random_state=seed)
        train = train.sort_index()
        where = f"{where} (after competition.max_train_rows={comp.max_train_rows})"
        _kind().check_labels(train["label"], n_folds, where)
    if comp.metric == "quadratic_weighted_kappa":
        _require_integer_labels(train["label"], where)
    return train, where, paths


def _bad_images(
    files: CompetitionFiles,
    train: pd.DataFrame,
    train_rels: list,
    bad_train: dict,
    test: _TestSide,
    bad_test: dict,
    skip_bad_images: bool,
) -> None:
    """Raise one error naming every undecodable or missing image, unless only training images are bad
    and `skip_bad_images` drops them (then a warning lists them)."""
    for i in bad_train:  # a missing file is named by where it was looked for
        expected = train["expected"].iloc[i]
        train_rels[i] = train_rels[i] or f"{expected} or {expected.rsplit('.', 1)[0]}.*"
    if bad_test or (bad_train and not skip_bad_images):
        parts = (
            [f"{len(bad_train)} bad training images: {_bad_list(files, train_rels, bad_train)}"] if bad_train else []
        )
        parts += [f"{len(bad_test)} bad test images: {_bad_list(files, test.paths, bad_test)}"] if bad_test else []
        hint = " (prepare.skip_bad_images: true drops bad training images)" if bad_train and not bad_test else ""
        raise PipelineError("; ".join(parts) + hint)
    if bad_train:
        print(
            f"warning: skipped {len(bad_train)} bad training images (prepare.skip_bad_images): "
            f"{_bad_list(files, train_rels, bad_train, limit=len(bad_train))}",
            file=sys.stderr,
        )


def _decode_all(
    files: CompetitionFiles,
    train: pd.DataFrame,
    test: _TestSide,
    tmp: Path,
    image_size: int,
    resize: str,
    workers: int,
    skip_bad_images: bool,
    n_folds: int,
    where: str,
) -> _Decoded:
    """Decode every training and test image into `tmp`'s caches before anything else is written."""
    train_rels = [p if isinstance(p, str) else None for p in train["path"]]  # pandas may hold None as nan
    train_sizes, sums, squares, bad_train = decode_images(
        files, train_rels, image_size, resize, workers, tmp / "train_images.npy", "decode train"
    )
    test_sizes, _, _, bad_test = decode_images(
        files, test.paths, image_size, resize, workers, tmp / "test_images.npy", "decode test"
    )
    _bad_images(files, train, train_rels, bad_train, test, bad_test, skip_bad_images)
    if bad_train:
        keep = np.setdiff1d(np.arange(len(train)), list(bad_train))
        if not len(keep):
            raise PipelineError(f"{where}: no training image could be read")
        keep_rows(tmp / "train_images.npy", keep)
        classes = set(train["label"])
        train, train_sizes, sums, squares = train.iloc[keep], train_sizes[keep], sums[keep], squares[keep]
        lost = sorted(classes - set(train["label"]))
        if lost:
            raise PipelineError(f"{where}: class '{lost[0]}' has no readable training image left")
        _kind().check_labels(train["label"], n_folds, where)
    return _Decoded(train, train_sizes, sums, squares, test_sizes, len(bad_train))


def _write_prepared(
    tmp: Path, d: _Decoded, test: _TestSide, task: Task, image_size: int, n_folds: int, group_column: str | None
) -> None:
    """The prepared folder's tables and JSON beside its image caches: rows, classes, format, and the
    normalisation statistics of the whole set and of each fold's training part."""
    train = d.train
    train["width"], train["height"] = d.train_sizes[:, 0], d.train_sizes[:, 1]  # for the analyze stage's slices
    pixels = image_size * image_size
    stats = channel_stats(d.sums, d.squares, pixels)
    in_training_part = {k: train["fold"].to_numpy() != k for k in range(n_folds)}
    stats["folds"] = {str(k): channel_stats(d.sums[m], d.squares[m], pixels) for k, m in in_training_part.items()}
    cols = ["id", "label", "target", "fold", "width", "height", "path"] + (["group"] if group_column else [])
    train[cols].to_csv(tmp / "train.csv", index=False)
    pd.DataFrame(
        {"id": test.ids, "width": d.test_sizes[:, 0], "height": d.test_sizes[:, 1], "path": test.paths}
    ).to_csv(tmp / "test.csv", index=False)
    if d.holdout is not None:
        d.holdout.to_csv(tmp / "holdout.csv", index=False)
    test.sample.to_csv(tmp / "sample_submission.csv", index=False)
    if test.answers is not None:
        test.answers.to_csv(tmp / "answers.csv", index=False)
    write_json(tmp / "classes.json", {"classes": task.classes, "task": task.name})
    write_json(tmp / "submission_format.json", dataclasses.asdict(test.fmt))
    write_json(tmp / "stats.json", stats)


def prepare(
    comp: CompetitionConfig,
    image_size: int,
    n_folds: int,
    seed: int,
    out_dir: str | Path,
    workers: int = 0,
    resize: str = "squash",
    skip_bad_images: bool = False,
    holdout: float | None = None,
) -> dict:
    """Validate the competition at `comp.source`, write `out_dir` atomically and return a summary.

    Every image it will use is decoded before anything is written; the undecodable and the missing
    are reported together (or, for training images with `skip_bad_images`, dropped and listed)."""
    source = Path(comp.source)
    if _digits_source(source):
        render_digits(source)
    files = open_competition(comp)
    train, where, train_paths = _read_rows(files, comp, n_folds, seed)
    task = _kind().from_labels(train["label"])
    sample, fmt, test_ids, test_paths = _read_test(files, comp, task, train_paths)
    test = _TestSide(sample, fmt, test_ids, test_paths, _read_answers(files, comp, fmt.id_column))
    with atomic_dir(out_dir) as tmp:
        decoded = _decode_all(
            files, train, test, tmp, image_size, resize, workers or os.cpu_count() or 1, skip_bad_images, n_folds, where
        )
        if holdout:
            decoded.holdout = _split_holdout(decoded, tmp, task, comp, holdout, n_folds, seed, where)
        decoded.train = _add_targets_and_folds(decoded.train, task, comp, n_folds, seed)
        _write_prepared(tmp, decoded, test, task, image_size, n_folds, comp.group_column)
    return {
        "source": str(source),
        "n_train": len(decoded.train),
        "n_test": len(test_ids),
        "n_holdout": 0 if decoded.holdout is None else len(decoded.holdout),
        "n_classes": len(task.classes),
        "image_size": image_size,
        "submission_format": fmt.kind,
        "skipped": decoded.skipped,
    }


def _require_integer_labels(labels: pd.Series, where: str) -> None:
    try:
        labels.astype(int)
    except ValueError:
        bad = next(v for v in labels if not v.lstrip("-").isdigit())
        raise PipelineError(
            f"{where}: label '{bad}' is not an integer grade "
            f"(competition.metric: quadratic_weighted_kappa needs ordinal integer labels)"
        ) from None
