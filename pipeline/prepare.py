"""`prepare` stage: raw competition files -> validated tables, folds, an image cache and stats.

    python -m pipeline prepare            # reads params.yaml, writes data/prepared/

Outputs (data/prepared/):
  train.csv          id, label (original value; multi-label: the labels joined by classes.json's delimiter),
                     target (single-label: the class index), fold, width, height, path[, group]
  test.csv           id, width, height, path, in the sample submission's order (width, height: the original
                     size; path: the image inside the competition)
  classes.json       the original label values, in class-index order, the task (the kind of target:
                     competition.task, or what auto read) and its options (multi-label: delimiter, beta)
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
from sklearn.model_selection import train_test_split

from pipeline.cache import channel_stats, decode_images, keep_rows
from pipeline.competition import (
    CompetitionFiles,
    ImageFolder,
    find_test_images,
    open_competition,
)
from pipeline.config import CompetitionConfig
from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, write_json
from pipeline.submission import SubmissionFormat
from pipeline.targets import read_train, require_columns
from pipeline.tasks import Task, assign_folds

DIGITS_MARKER = "SKLEARN_DIGITS"  # in a source folder: render scikit-learn's digits there
# in a source folder: render 2x2 mosaics of the digits there, a multi-label competition tagged with the digits shown
# (layout "sum": a regression, each mosaic scored with the sum of its digits; "grade": that sum cut into grades)
MOSAIC_MARKERS = {
    "SKLEARN_DIGITS_TAGS": "tags",
    "SKLEARN_DIGITS_COLUMNS": "columns",
    "SKLEARN_DIGITS_SUM": "sum",
    "SKLEARN_DIGITS_GRADE": "grade",
}


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


def _mosaics(digits, pool: np.ndarray, n: int, rng: np.random.Generator):
    """`n` (16x16 image, digits shown) pairs: 2x2 tiles of digits drawn from `pool`, a quarter blank."""
    for _ in range(n):
        shown = rng.random(4) >= 0.25
        shown[rng.integers(4)] = True
        picks = rng.choice(pool, 4)
        img = np.zeros((16, 16), dtype=np.uint8)
        for t in np.flatnonzero(shown):
            r, c = divmod(t, 2)
            img[8 * r : 8 * r + 8, 8 * c : 8 * c + 8] = (digits.images[picks[t]] * (255 / 16)).round()
        yield img, [int(digits.target[picks[t]]) for t in np.flatnonzero(shown)]


def render_digit_mosaics(
    out_dir: str | Path, layout: str, n_train: int = 1500, n_test: int = 300, seed: int = 0
) -> Path:
    """Write a multi-label competition into `out_dir` (keeping its marker file): 16x16 images of 2x2 tiles,
    each tile one of scikit-learn's digits (8x8) or blank (a quarter of the tiles, never all four), tagged
    with the distinct digits shown. Test mosaics use other digits than the training ones (a stratified 20%).

    layout "tags": train.csv `id,tags` (space-separated digits, like HPA's class ids), scored by F2 (Planet's);
    "columns": train.csv `id,digit_0..digit_9` (0/1 each, like RANZCR's), a probability column per label;
    "sum": train.csv `id,score`, the sum of the digits shown (0-36), a regression scored by RMSE (Pawpularity's
    layout); "grade": train.csv `id_code,diagnosis`, that sum cut into grades 0-4 (sum // 7, at most 4: the
    higher grades rarer, as APTOS's), scored by quadratic weighted kappa. solution.csv holds the test answers
    (a local leaderboard)."""
    from sklearn.datasets import load_digits

    out_dir = Path(out_dir)
    if (out_dir / "sample_submission.csv").exists():
        return out_dir
    digits = load_digits()
    pool_train, pool_test = train_test_split(
        np.arange(len(digits.target)), test_size=0.2, stratify=digits.target, random_state=seed
    )
    rng = np.random.default_rng(seed)
    markers = {m: (out_dir / m).read_text() for m in MOSAIC_MARKERS if (out_dir / m).exists()}
    with atomic_dir(out_dir) as tmp:
        for marker, text in markers.items():
            (tmp / marker).write_text(text)
        tables = {}
        for split, pool, n in (("train", pool_train, n_train), ("test", pool_test, n_test)):
            (tmp / split).mkdir()
            rows = []
            for i, (img, shown) in enumerate(_mosaics(digits, pool, n, rng)):
                image_id = f"{split}_{i:05d}"
                Image.fromarray(img, mode="L").save(tmp / split / f"{image_id}.png")
                value = sum(shown) if layout == "sum" else min(4, sum(shown) // 7) if layout == "grade" else None
                rows.append((image_id, sorted(set(shown)) if value is None else value))
            tables[split] = rows
        _write_mosaic_tables(tmp, layout, tables["train"], tables["test"])
    return out_dir


def _write_mosaic_tables(tmp: Path, layout: str, train: list, test: list) -> None:
    """train.csv, sample_submission.csv and solution.csv of a mosaic competition: (id, answer) rows."""
    columns = [f"digit_{d}" for d in range(10)]
    if layout in ("sum", "grade"):
        ids = lambda rows: [i for i, _ in rows]  # noqa: E731
        id_col, col, sample = ("id", "score", 18.5) if layout == "sum" else ("id_code", "diagnosis", 0)
        pd.DataFrame({id_col: ids(train), col: [v for _, v in train]}).to_csv(tmp / "train.csv", index=False)
        pd.DataFrame({id_col: ids(test), col: sample}).to_csv(tmp / "sample_submission.csv", index=False)
        pd.DataFrame({id_col: ids(test), col: [v for _, v in test]}).to_csv(tmp / "solution.csv", index=False)
        return
    if layout == "tags":
        pd.DataFrame({"id": [i for i, _ in train], "tags": [" ".join(map(str, t)) for _, t in train]}).to_csv(
            tmp / "train.csv", index=False
        )
        pd.DataFrame({"id": [i for i, _ in test], "tags": "0"}).to_csv(tmp / "sample_submission.csv", index=False)
    else:
        hot = lambda rows: pd.DataFrame([[int(d in t) for d in range(10)] for _, t in rows], columns=columns)  # noqa: E731
        hot(train).assign(id=[i for i, _ in train])[["id", *columns]].to_csv(tmp / "train.csv", index=False)
        pd.DataFrame(0.5, index=range(len(test)), columns=columns).assign(id=[i for i, _ in test])[
            ["id", *columns]
        ].to_csv(tmp / "sample_submission.csv", index=False)
    name = (lambda t: " ".join(map(str, t))) if layout == "tags" else (lambda t: " ".join(columns[d] for d in t))
    pd.DataFrame({"id": [i for i, _ in test], "tags": [name(t) for _, t in test]}).to_csv(
        tmp / "solution.csv", index=False
    )


# ---------------------------------------------------------------- validation helpers


def holdout_mask(
    task: Task, stratify: np.ndarray, share: float, seed: int, groups: np.ndarray | None, where: str
) -> np.ndarray:
    """`cv.holdout`: a share of the rows (True), kept out of every fold, stratified as the task's folds are
    (group-aware: no group on both sides)."""
    mask = np.zeros(len(stratify), dtype=bool)
    try:
        idx = task.holdout_rows(stratify, share, seed, groups)
    except ValueError as exc:
        raise PipelineError(f"{where}: cv.holdout={share} cannot be drawn stratified: {exc}") from None
    mask[idx] = True
    return mask


# ---------------------------------------------------------------- image cache


def _bad_list(files: CompetitionFiles, rels: list[str], bad: dict[int, str], limit: int = 10) -> str:
    shown = [f"{files.where(rels[i]) if rels[i] else i} ({why})" for i, why in sorted(bad.items())[:limit]]
    return "; ".join(shown) + (f"; and {len(bad) - limit} more" if len(bad) > limit else "")


# ---------------------------------------------------------------- the stage


def _with_target(rows: pd.DataFrame, task: Task) -> pd.DataFrame:
    """`rows` with a `target` column where the task's target is one number per row (a class index); a
    multi-label target is read back from `label`."""
    targets = task.encode(rows["label"])
    return rows.assign(target=targets) if targets.ndim == 1 else rows


def _add_targets_and_folds(
    train: pd.DataFrame, task: Task, comp: CompetitionConfig, n_folds: int, seed: int
) -> pd.DataFrame:
    train = _with_target(train.reset_index(drop=True), task)
    groups = train["group"].to_numpy() if comp.group_column else None
    train["fold"] = assign_folds(task, task.stratify_on(task.encode(train["label"])), n_folds, seed, groups)
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
    mask = holdout_mask(task, task.stratify_on(train["label"].to_numpy()), share, seed, groups, where)
    keep, held = np.flatnonzero(~mask), np.flatnonzero(mask)
    keep_rows(tmp / "train_images.npy", held, dest=tmp / "holdout_images.npy")
    keep_rows(tmp / "train_images.npy", keep)
    holdout = _with_target(train.iloc[held].reset_index(drop=True), task)
    holdout["width"], holdout["height"] = d.train_sizes[held, 0], d.train_sizes[held, 1]
    d.train, d.train_sizes, d.sums, d.squares = train.iloc[keep], d.train_sizes[keep], d.sums[keep], d.squares[keep]
    task.check_labels(d.train["label"], n_folds, f"{where} (after cv.holdout={share})")
    cols = ["id", "label", "target", "width", "height", "path"] + (["group"] if comp.group_column else [])
    return holdout[[c for c in cols if c in holdout.columns]]


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


def _render_embedded(source: Path) -> None:
    """A folder holding DIGITS_MARKER (or a MOSAIC_MARKERS file) is where the embedded digits competition
    (or its multi-label mosaics) is rendered, once."""
    if not source.is_dir():
        return
    if (source / DIGITS_MARKER).exists():
        render_digits(source)
    for marker, layout in MOSAIC_MARKERS.items():
        if (source / marker).exists():
            render_digit_mosaics(source, layout)


def _read_answers(files: CompetitionFiles, comp: CompetitionConfig, id_column: str) -> pd.DataFrame | None:
    """The test labels, where the competition has them (a local leaderboard, never used to choose)."""
    if not (comp.answers and files.exists(comp.answers)):
        return None
    answers = files.read_csv(comp.answers)
    require_columns(answers, {"id_column": id_column}, files.where(comp.answers))
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
) -> tuple[pd.DataFrame, str, set[str], Task]:
    """The training rows (subsampled to `competition.max_train_rows`), checked; where they come from;
    every training image path, before any subsample (none of them is a test image); the task."""
    where = files.where(comp.train_csv or comp.train_dir)
    train, task = read_train(files, comp)
    paths = {p for p in train["path"] if isinstance(p, str)}
    task.check_labels(train["label"], n_folds, where)
    if comp.max_train_rows is not None and comp.max_train_rows < len(train):
        keep = task.subsample_rows(task.stratify_on(train["label"].to_numpy()), comp.max_train_rows, seed)
        train = train.iloc[np.sort(keep)]
        where = f"{where} (after competition.max_train_rows={comp.max_train_rows})"
        task.check_labels(train["label"], n_folds, where)
    if comp.metric == "quadratic_weighted_kappa":
        _require_integer_labels(train["label"], where)
    if comp.metric not in task.METRICS:
        raise PipelineError(
            f"competition.metric: {comp.metric} is not a {task.name} metric (choose from {', '.join(task.METRICS)})"
        )
    return train, where, paths, task


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
    task: Task,
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
        train, train_sizes, sums, squares = train.iloc[keep], train_sizes[keep], sums[keep], squares[keep]
        lost = [c for c, n in zip(task.classes, task.class_counts(train["label"])) if n == 0]
        if lost:
            raise PipelineError(f"{where}: class '{lost[0]}' has no readable training image left")
        task.check_labels(train["label"], n_folds, where)
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
    train[[c for c in cols if c in train.columns]].to_csv(tmp / "train.csv", index=False)
    pd.DataFrame(
        {"id": test.ids, "width": d.test_sizes[:, 0], "height": d.test_sizes[:, 1], "path": test.paths}
    ).to_csv(tmp / "test.csv", index=False)
    if d.holdout is not None:
        d.holdout.to_csv(tmp / "holdout.csv", index=False)
    test.sample.to_csv(tmp / "sample_submission.csv", index=False)
    if test.answers is not None:
        test.answers.to_csv(tmp / "answers.csv", index=False)
    write_json(tmp / "classes.json", {"classes": task.classes, "task": task.name, **task.options})
    write_json(
        tmp / "submission_format.json",
        {k: v for k, v in dataclasses.asdict(test.fmt).items() if v is not None or k != "delimiter"},
    )
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
    _render_embedded(source)
    files = open_competition(comp)
    train, where, train_paths, task = _read_rows(files, comp, n_folds, seed)
    sample, fmt, test_ids, test_paths = _read_test(files, comp, task, train_paths)
    test = _TestSide(sample, fmt, test_ids, test_paths, _read_answers(files, comp, fmt.id_column))
    with atomic_dir(out_dir) as tmp:
        decoded = _decode_all(
            files,
            train,
            test,
            tmp,
            image_size,
            resize,
            workers or os.cpu_count() or 1,
            skip_bad_images,
            n_folds,
            where,
            task,
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
        "target": task.describe(),
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
