"""`prepare` stage: raw competition files -> validated tables, folds, an image cache and stats.

    python -m pipeline prepare            # reads params.yaml, writes data/prepared/

Outputs (data/prepared/):
  train.csv          id, label (original value), target (class index), fold, width, height[, group]
  test.csv           id, width, height, in the sample submission's order (width, height: the original size)
  classes.json       the original label values, in class-index order
  train_images.npy   uint8 (N, S, S, 3), rows aligned with train.csv
  test_images.npy    uint8 (M, S, S, 3), rows aligned with test.csv
  stats.json         per-channel mean/std (0-1 scale) of all train images and of each fold's training part
  sample_submission.csv, answers.csv (if the competition ships test labels)
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split
from tqdm import tqdm

from pipeline.config import CompetitionConfig
from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, write_json
from pipeline.submission import read_submission_format

DIGITS = "sklearn-digits"


# ---------------------------------------------------------------- raw files: a folder or a zip


class CompetitionFiles:
    """Read-only view of a Kaggle competition, unpacked in a folder or still inside its .zip."""

    def __init__(self, source: str | Path, prefix: str = ""):
        self.source = Path(source)
        self._zip = None
        self.prefix = prefix  # folder inside a zip that holds the competition ("" = its top)
        if not self.source.exists():
            raise PipelineError(f"competition.source: '{source}' does not exist")
        if self.source.is_file():
            if not zipfile.is_zipfile(self.source):
                raise PipelineError(f"{self.source}: not a folder or a .zip file")
            self._zip = zipfile.ZipFile(self.source)
            self._names = set(self._zip.namelist())

    def set_root(self, marker: str) -> None:
        """Kaggle zips hold the files at the top or inside one folder: find the one holding `marker`."""
        if self._zip is None:
            return
        if marker in self._names:
            return
        roots = sorted({n[: -len(marker)] for n in self._names if n.endswith("/" + marker)}, key=len)
        if roots:
            self.prefix = roots[0]

    def where(self, rel: str) -> str:
        return f"{self.source}/{self.prefix}{rel}" if self._zip else str(self.source / rel)

    def exists(self, rel: str) -> bool:
        if self._zip is not None:
            return self.prefix + rel in self._names
        return (self.source / rel).exists()

    def read(self, rel: str) -> bytes:
        try:
            if self._zip is not None:
                return self._zip.read(self.prefix + rel)
            return (self.source / rel).read_bytes()
        except (KeyError, FileNotFoundError):
            raise PipelineError(f"{self.where(rel)}: file not found") from None
        except OSError as exc:
            raise PipelineError(f"{self.where(rel)}: cannot read ({exc.strerror or exc})") from None

    def list_dir(self, rel: str) -> list[str]:
        """File names directly inside folder `rel`."""
        if self._zip is not None:
            start = f"{self.prefix}{rel.rstrip('/')}/"
            return [n[len(start):] for n in self._names if n.startswith(start) and "/" not in n[len(start):] and n != start]
        folder = self.source / rel
        if not folder.is_dir():
            raise PipelineError(f"{folder}: image folder not found")
        return os.listdir(folder)

    def read_csv(self, rel: str) -> pd.DataFrame:
        if not self.exists(rel):
            raise PipelineError(f"{self.where(rel)}: file not found")
        try:
            return pd.read_csv(io.BytesIO(self.read(rel)), dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise PipelineError(f"{self.where(rel)}: not a readable CSV ({exc})") from None


# ---------------------------------------------------------------- the embedded default competition


def render_digits(out_dir: str | Path, test_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write scikit-learn's bundled digits as a Kaggle competition (PNG images) into `out_dir`.

    80% train / 20% test, stratified; test labels go to `solution.csv`, as Kaggle keeps them.
    """
    from sklearn.datasets import load_digits

    out_dir = Path(out_dir)
    if (out_dir / "sample_submission.csv").exists():
        return out_dir
    digits = load_digits()
    ids = np.arange(len(digits.target))
    train_ids, test_ids = train_test_split(
        ids, test_size=test_fraction, stratify=digits.target, random_state=seed
    )
    with atomic_dir(out_dir) as tmp:
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
        pd.DataFrame({"id": test_sorted, "label": digits.target[test_sorted]}).to_csv(
            tmp / "solution.csv", index=False
        )
    return out_dir


# ---------------------------------------------------------------- validation helpers


def sort_classes(labels) -> list[str]:
    """Class order: numeric when every label is an integer ('2' < '10'), else lexicographic."""
    unique = set(labels)
    try:
        return sorted(unique, key=lambda s: int(s))
    except ValueError:
        return sorted(unique)


def _require_columns(df: pd.DataFrame, columns: dict[str, str], where: str) -> None:
    for key, column in columns.items():
        if column not in df.columns:
            raise PipelineError(
                f"{where}: no column '{column}' (set competition.{key}); columns are {list(df.columns)}"
            )


def _check_unique(ids: pd.Series, where: str) -> None:
    dup = ids[ids.duplicated()]
    if len(dup):
        row = int(dup.index[0]) + 2  # 1-based, after the header line
        raise PipelineError(f"{where}: duplicate id '{dup.iloc[0]}' (row {row})")


def _check_class_counts(labels: pd.Series, n_folds: int, where: str) -> None:
    counts = labels.value_counts()
    rare = counts[counts < n_folds]
    if len(rare):
        raise PipelineError(
            f"{where}: class '{rare.index[0]}' has {int(rare.iloc[0])} examples, fewer than cv.n_folds={n_folds}"
        )


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


def _decode(data: bytes, where: str, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(uint8 (size, size, 3) image, original (width, height))."""
    try:
        img = Image.open(io.BytesIO(data))
        original = img.size
        img.draft("RGB", (size, size))  # JPEG: let the decoder downscale large photos (1/2, 1/4, 1/8)
        img.load()
        img = img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise PipelineError(f"{where}: cannot decode image ({exc.__class__.__name__}: {exc})") from None
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8), original


_worker_files: CompetitionFiles | None = None  # one open view per decoding process (a zip's index is slow to read)


def _init_worker(source: str, prefix: str) -> None:
    global _worker_files
    _worker_files = CompetitionFiles(source, prefix)


def _decode_chunk(args, files: CompetitionFiles | None = None) -> tuple[np.ndarray, np.ndarray]:
    rels, size = args
    files = files or _worker_files
    out = np.empty((len(rels), size, size, 3), dtype=np.uint8)
    sizes = np.empty((len(rels), 2), dtype=np.int64)
    for i, rel in enumerate(rels):
        out[i], sizes[i] = _decode(files.read(rel), files.where(rel), size)
    return out, sizes


def decode_images(files: CompetitionFiles, rels: list[str], size: int, workers: int,
                  desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image once, in `workers` processes: (uint8 (N, size, size, 3) cache,
    int (N, 2) original width and height)."""
    for rel in rels:
        if not files.exists(rel):
            raise PipelineError(f"{files.where(rel)}: image file not found")
    chunk = 1024
    jobs = [(rels[i : i + chunk], size) for i in range(0, len(rels), chunk)]
    out = np.empty((len(rels), size, size, 3), dtype=np.uint8)
    sizes = np.empty((len(rels), 2), dtype=np.int64)
    parallel = workers > 1 and len(jobs) > 1
    if parallel:  # each process opens the files itself: a forked zip handle would share its read offset
        pool = mp.get_context("fork" if os.name == "posix" else "spawn").Pool(workers, _init_worker, (str(files.source), files.prefix))
        results = pool.imap(_decode_chunk, jobs)
    else:
        results = (_decode_chunk(job, files) for job in jobs)
    bar = tqdm(total=len(rels), desc=desc, unit="img", mininterval=1.0)
    try:
        for i, (arr, wh) in enumerate(results):
            out[i * chunk : i * chunk + len(arr)] = arr
            sizes[i * chunk : i * chunk + len(arr)] = wh
            bar.update(len(arr))
    finally:
        bar.close()
        if parallel:
            pool.terminate()
    return out, sizes


def channel_sums(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image, per-channel sums of pixel values and of their squares (0-1 scale), shape (N, C) each.

    One pass over the cache; the statistics of any subset of images (each fold's training part)
    then cost a sum over these rows instead of another pass.
    """
    n, c = len(images), images.shape[-1]
    s, ss = np.empty((n, c)), np.empty((n, c))
    for start in range(0, n, 4096):
        block = images[start : start + 4096].reshape(-1, images.shape[1] * images.shape[2], c) / 255.0
        s[start : start + len(block)] = block.sum(1)
        ss[start : start + len(block)] = np.einsum("npc,npc->nc", block, block)
    return s, ss


def channel_stats(sums: np.ndarray, squares: np.ndarray, pixels_per_image: int) -> dict[str, list[float]]:
    """Mean and std per channel of the images whose `channel_sums` rows are given."""
    n = len(sums) * pixels_per_image
    mean = sums.sum(0) / n
    std = np.sqrt(np.maximum(squares.sum(0) / n - mean**2, 1e-12))
    return {"mean": mean.tolist(), "std": std.tolist()}


# ---------------------------------------------------------------- the stage


def _read_train(files: CompetitionFiles, comp: CompetitionConfig, n_folds: int, seed: int
                ) -> tuple[pd.DataFrame, list[str]]:
    """train.csv checked, renamed to id/label[/group], subsampled if asked, with target and fold columns."""
    train_where = files.where(comp.train_csv)
    train = files.read_csv(comp.train_csv)
    needed = {"id_column": comp.id_column, "label_column": comp.label_column}
    if comp.group_column:
        needed["group_column"] = comp.group_column
    _require_columns(train, needed, train_where)
    train = train.rename(columns={comp.id_column: "id", comp.label_column: "label"})
    if comp.group_column:
        train = train.rename(columns={comp.group_column: "group"})
    empty = train.index[(train["id"] == "") | (train["label"] == "")]
    if len(empty):
        raise PipelineError(f"{train_where}: empty id or label in row {int(empty[0]) + 2}")
    _check_unique(train["id"], train_where)
    _check_class_counts(train["label"], n_folds, train_where)
    classes = sort_classes(train["label"])

    if comp.max_train_rows is not None and comp.max_train_rows < len(train):
        train, _ = train_test_split(
            train, train_size=comp.max_train_rows, stratify=train["label"], random_state=seed
        )
        train = train.sort_index()
        _check_class_counts(train["label"], n_folds, f"{train_where} (after competition.max_train_rows={comp.max_train_rows})")
        classes = sort_classes(train["label"])
    train = train.reset_index(drop=True)
    train["target"] = train["label"].map({c: i for i, c in enumerate(classes)}).astype(np.int64)
    groups = train["group"].to_numpy() if comp.group_column else None
    train["fold"] = assign_folds(train["target"].to_numpy(), n_folds, seed, groups)
    return train, classes


def _read_sample(files: CompetitionFiles, comp: CompetitionConfig, comp_ext: str, classes: list[str]):
    """The sample submission, its format and test ids, each id matched by exactly one test image."""
    sample_where = files.where(comp.sample_submission)
    sample = files.read_csv(comp.sample_submission)
    fmt = read_submission_format(sample, classes, sample_where)
    _check_unique(sample[fmt.id_column], sample_where)
    test_ids = sample[fmt.id_column].tolist()
    on_disk = {n[: -len(comp_ext)] for n in files.list_dir(comp.test_dir) if n.endswith(comp_ext)}
    missing_row = sorted(on_disk - set(test_ids))
    if missing_row:
        raise PipelineError(
            f"{files.where(comp.test_dir + '/' + missing_row[0] + comp_ext)}: test image has no row in {sample_where}"
            f" ({len(missing_row)} such images)"
        )
    missing_img = [i for i in test_ids if i not in on_disk]
    if missing_img:
        raise PipelineError(
            f"{sample_where}: id '{missing_img[0]}' has no image {files.where(comp.test_dir + '/' + missing_img[0] + comp_ext)}"
            f" ({len(missing_img)} such rows)"
        )
    return sample, fmt, test_ids


def prepare(comp: CompetitionConfig, image_size: int, n_folds: int, seed: int, out_dir: str | Path,
            workers: int = 0, raw_dir: str | Path = "data/raw") -> dict:
    """Validate the competition at `comp.source`, write `out_dir` atomically and return a summary."""
    if comp.source == DIGITS:
        source = render_digits(Path(raw_dir) / DIGITS)
        comp_ext = ".png"
    else:
        source = Path(comp.source)
        comp_ext = comp.image_ext
    files = CompetitionFiles(source)
    files.set_root(comp.train_csv)
    workers = workers or os.cpu_count() or 1

    train, classes = _read_train(files, comp, n_folds, seed)
    sample, fmt, test_ids = _read_sample(files, comp, comp_ext, classes)

    answers = None
    if comp.answers and files.exists(comp.answers):
        answers = files.read_csv(comp.answers)
        _require_columns(answers, {"id_column": fmt.id_column}, files.where(comp.answers))

    train_images, train_sizes = decode_images(
        files, [f"{comp.train_dir}/{i}{comp_ext}" for i in train["id"]], image_size, workers, "decode train"
    )
    test_images, test_sizes = decode_images(
        files, [f"{comp.test_dir}/{i}{comp_ext}" for i in test_ids], image_size, workers, "decode test"
    )
    train["width"], train["height"] = train_sizes[:, 0], train_sizes[:, 1]  # for the analyze stage's slices
    sums, squares = channel_sums(train_images)
    pixels = image_size * image_size
    stats = channel_stats(sums, squares, pixels)
    in_training_part = {k: train["fold"].to_numpy() != k for k in range(n_folds)}
    stats["folds"] = {str(k): channel_stats(sums[m], squares[m], pixels) for k, m in in_training_part.items()}

    with atomic_dir(out_dir) as tmp:
        cols = ["id", "label", "target", "fold", "width", "height"] + (["group"] if comp.group_column else [])
        train[cols].to_csv(tmp / "train.csv", index=False)
        pd.DataFrame({"id": test_ids, "width": test_sizes[:, 0], "height": test_sizes[:, 1]}).to_csv(
            tmp / "test.csv", index=False)
        np.save(tmp / "train_images.npy", train_images)
        np.save(tmp / "test_images.npy", test_images)
        sample.to_csv(tmp / "sample_submission.csv", index=False)
        if answers is not None:
            answers.to_csv(tmp / "answers.csv", index=False)
        write_json(tmp / "classes.json", {"classes": classes})
        write_json(tmp / "stats.json", stats)
    return {
        "source": str(source), "n_train": len(train), "n_test": len(test_ids),
        "n_classes": len(classes), "image_size": image_size, "submission_format": fmt.kind,
    }
