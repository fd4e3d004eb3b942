"""`prepare` stage: raw competition files -> validated tables, folds, an image cache and stats.

    python -m pipeline prepare            # reads params.yaml, writes data/prepared/

Outputs (data/prepared/):
  train.csv          id, label (original value), target (class index), fold, width, height, path[, group]
  test.csv           id, width, height, path, in the sample submission's order (width, height: the original
                     size; path: the image inside the competition)
  classes.json       the original label values, in class-index order
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
import io
import multiprocessing as mp
import os
import posixpath
import signal
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split
from tqdm import tqdm

from pipeline.config import CompetitionConfig
from pipeline.errors import PipelineError
from pipeline.images import decode_image
from pipeline.io import atomic_dir, atomic_save, write_json
from pipeline.submission import SubmissionFormat, read_submission_format

DIGITS_MARKER = "SKLEARN_DIGITS"  # in a source folder: render scikit-learn's digits there


# ---------------------------------------------------------------- raw files: a folder or a zip

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}


def inside(value: str, where: str) -> str:
    """`value` (an id or a path from a CSV) as a normalised path relative to the competition, or a
    PipelineError if it would leave the competition's folder (`../`, an absolute path, a drive)."""
    path = value.replace("\\", "/")
    norm = posixpath.normpath(path)
    if path.startswith("/") or norm == ".." or norm.startswith("../") or (len(path) > 1 and path[1] == ":"):
        raise PipelineError(f"{where}: '{value}' leaves the competition folder")
    return "" if norm == "." else norm


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
        if marker in self._names or (marker.endswith("/") and any(n.startswith(marker) for n in self._names)):
            return
        if marker.endswith("/"):  # a folder: zips need not list folders themselves, only their files
            roots = sorted({n[: n.index("/" + marker) + 1] for n in self._names if "/" + marker in n}, key=len)
        else:
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

    def images_under(self, rel: str) -> list[str]:
        """Paths, relative to folder `rel`, of every image file under it, nested folders included."""
        rel = rel.strip("/")
        if self._zip is not None:
            start = f"{self.prefix}{rel}/" if rel else self.prefix
            names = [n[len(start) :] for n in self._names if n.startswith(start) and not n.endswith("/")]
        else:
            folder = self.source / rel
            if not folder.is_dir():
                raise PipelineError(f"{folder}: image folder not found")
            names = [
                os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
                for d, _, fs in os.walk(folder)
                for f in fs
            ]
        return sorted(n for n in names if posixpath.splitext(n)[1].lower() in IMAGE_EXTS)

    def read_csv(self, rel: str) -> pd.DataFrame:
        if not self.exists(rel):
            raise PipelineError(f"{self.where(rel)}: file not found")
        try:
            return pd.read_csv(io.BytesIO(self.read(rel)), dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise PipelineError(f"{self.where(rel)}: not a readable CSV ({exc})") from None


class ImageFolder:
    """The images under one folder of the competition, found from an id or a relative path: the
    value as it is (an id that carries its extension, a path into nested folders), then with
    `ext` appended, then the one file whose path without its extension is the value (mixed
    extensions), then the one file in any subfolder whose name without its extension is the value."""

    def __init__(self, files: CompetitionFiles, folder: str, ext: str, exclude: set[str] = frozenset()):
        """`exclude`: paths inside the competition that are not this folder's (training images that
        share the test folder)."""
        self.files, self.folder, self.ext = files, folder.strip("/"), ext
        self.paths = {p for p in files.images_under(self.folder) if self.rel(p) not in exclude}
        self.by_stem: dict[str, list[str]] = {}
        self.by_name: dict[str, list[str]] = {}
        for path in sorted(self.paths):
            stem = posixpath.splitext(path)[0]
            self.by_stem.setdefault(stem, []).append(path)
            self.by_name.setdefault(posixpath.basename(stem), []).append(path)

    def rel(self, path: str) -> str:
        """`path` (relative to this folder) relative to the competition."""
        return posixpath.join(self.folder, path) if self.folder else path

    def find(self, value: str, where: str) -> str | None:
        """The image's path relative to this folder, or None if there is none."""
        path = inside(value, where)
        for candidate in (path, path + self.ext if self.ext else None):
            if candidate in self.paths:
                return candidate
        matches = self.by_stem.get(path) or ([] if "/" in path else self.by_name.get(path, []))
        if len(matches) > 1:
            raise PipelineError(
                f"{where}: '{value}' matches {len(matches)} files in {self.files.where(self.folder)} "
                f"({', '.join(matches[:3])}): name the file with its extension"
            )
        return matches[0] if matches else None


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


_worker_files: CompetitionFiles | None = None  # one open view per decoding process (a zip's index is slow to read)


def _init_worker(source: str, prefix: str) -> None:
    # A forked worker inherits the stage's stop handlers (`stop_on_signals`), which can swallow the SIGTERM of
    # Pool.terminate(): a worker then waited for the queue's lock forever and prepare hung after decoding.
    # The parent handles Ctrl-C and SIGTERM; a worker ignores Ctrl-C and dies of SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    global _worker_files
    _worker_files = CompetitionFiles(source, prefix)


def _decode_chunk(args, files: CompetitionFiles | None = None):
    """Decode a chunk: (uint8 images, original sizes, per-image channel sums and sums of squares,
    {index in the chunk: why it failed}); a failed image is left black and reported, not raised."""
    rels, size, resize = args
    files = files or _worker_files
    out = np.zeros((len(rels), size, size, 3), dtype=np.uint8)
    sizes = np.zeros((len(rels), 2), dtype=np.int64)
    bad = {}
    for i, rel in enumerate(rels):
        if rel is None:
            bad[i] = "no such image file"
            continue
        try:
            out[i], sizes[i] = decode_image(files.read(rel), size, resize)
        except (ValueError, PipelineError) as exc:
            bad[i] = str(exc)
    return out, sizes, *channel_sums(out), bad


def chunk_rows(size: int) -> int:
    """Images per decoding chunk: about 32 MB of cache, so memory stays bounded at any image size."""
    return int(np.clip(2**25 // (size * size * 3), 1, 1024))


def decode_images(
    files: CompetitionFiles, rels: list[str | None], size: int, resize: str, workers: int, out_path: Path, desc: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, str]]:
    """Decode every image once, in `workers` processes, straight into the .npy file `out_path`
    (uint8 (N, size, size, 3)): memory holds a few chunks, never the cache. `None` in `rels` is a
    missing file. Returns (original width and height (N, 2), channel sums and sums of squares (N, 3)
    each, {row: why the image is bad}) with every bad image reported, none raised."""
    step = chunk_rows(size)
    jobs = [(rels[i : i + step], size, resize) for i in range(0, len(rels), step)]
    sizes = np.zeros((len(rels), 2), dtype=np.int64)
    sums, squares = np.zeros((len(rels), 3)), np.zeros((len(rels), 3))
    bad: dict[int, str] = {}
    parallel = workers > 1 and len(jobs) > 1
    if parallel:  # each process opens the files itself: a forked zip handle would share its read offset
        pool = mp.get_context("fork" if os.name == "posix" else "spawn").Pool(
            workers, _init_worker, (str(files.source), files.prefix)
        )
        results = pool.imap(_decode_chunk, jobs)
    else:
        results = (_decode_chunk(job, files) for job in jobs)
    bar = tqdm(total=len(rels), desc=desc, unit="img", mininterval=1.0)
    try:
        with open(out_path, "wb") as f:  # chunks arrive in order: the file is written front to back
            np.lib.format.write_array_header_2_0(
                f, {"descr": "|u1", "fortran_order": False, "shape": (len(rels), size, size, 3)}
            )
            for i, (arr, wh, s, ss, failed) in enumerate(results):
                rows = slice(i * step, i * step + len(arr))
                f.write(arr.tobytes())
                sizes[rows], sums[rows], squares[rows] = wh, s, ss
                bad.update({i * step + j: why for j, why in failed.items()})
                bar.update(len(arr))
    except BaseException:
        if parallel:
            pool.terminate()
        raise
    finally:
        bar.close()
    if parallel:  # every chunk is in: the workers end on the queue's sentinels, no signal needed
        pool.close()
        pool.join()
    return sizes, sums, squares, bad


def keep_rows(path: Path, keep: np.ndarray, dest: Path | None = None) -> None:
    """Rewrite the .npy image cache at `path` (or write `dest`) with only the rows `keep`, a chunk at a time."""

    def write(tmp: Path) -> None:
        cache = np.load(path, mmap_mode="r")  # closed before the new file replaces it
        step = chunk_rows(cache.shape[1])
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_2_0(
                f, {"descr": "|u1", "fortran_order": False, "shape": (len(keep), *cache.shape[1:])}
            )
            for start in range(0, len(keep), step):
                f.write(np.ascontiguousarray(cache[keep[start : start + step]]).tobytes())

    atomic_save(dest or path, write)


def channel_sums(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image, per-channel sums of pixel values and of their squares (0-1 scale), shape (N, C) each,
    computed in float32 a few images at a time (float64 only for the sums themselves).

    The statistics of any subset of images (each fold's training part) then cost a sum over these
    rows instead of another pass over the cache.
    """
    n, c = len(images), images.shape[-1]
    s, ss = np.empty((n, c)), np.empty((n, c))
    step = max(1, 2**22 // max(1, images[0].size if n else 1))  # ~16 MB of float32 at a time
    for start in range(0, n, step):
        block = images[start : start + step].reshape(-1, images.shape[1] * images.shape[2], c).astype(np.float32)
        block /= 255.0
        s[start : start + len(block)] = block.sum(1, dtype=np.float64)
        ss[start : start + len(block)] = np.einsum("npc,npc->nc", block, block, dtype=np.float64)
    return s, ss


def channel_stats(sums: np.ndarray, squares: np.ndarray, pixels_per_image: int) -> dict[str, list[float]]:
    """Mean and std per channel of the images whose `channel_sums` rows are given."""
    n = len(sums) * pixels_per_image
    mean = sums.sum(0) / n
    std = np.sqrt(np.maximum(squares.sum(0) / n - mean**2, 1e-12))
    return {"mean": mean.tolist(), "std": std.tolist()}


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
    _check_unique(train["id"], train_where)
    folder = ImageFolder(files, comp.train_dir, comp.image_ext)
    names = train[comp.path_column] if comp.path_column else train["id"]
    found = [folder.find(v, f"{train_where} row {i + 2}") for i, v in enumerate(names)]
    train["path"] = [folder.rel(p) if p else None for p in found]
    train["expected"] = [folder.rel(inside(v, "") + comp.image_ext) for v in names]  # named if missing
    return train


def _add_targets_and_folds(
    train: pd.DataFrame, classes: list[str], comp: CompetitionConfig, n_folds: int, seed: int
) -> pd.DataFrame:
    train = train.reset_index(drop=True)
    train["target"] = train["label"].map({c: i for i, c in enumerate(classes)}).astype(np.int64)
    groups = train["group"].to_numpy() if comp.group_column else None
    train["fold"] = assign_folds(train["target"].to_numpy(), n_folds, seed, groups)
    return train


def _split_holdout(
    d: _Decoded,
    tmp: Path,
    classes: list[str],
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
    mask = holdout_mask(train["label"].to_numpy(), share, seed, groups, where)
    keep, held = np.flatnonzero(~mask), np.flatnonzero(mask)
    keep_rows(tmp / "train_images.npy", held, dest=tmp / "holdout_images.npy")
    keep_rows(tmp / "train_images.npy", keep)
    holdout = train.iloc[held].reset_index(drop=True)
    holdout["target"] = holdout["label"].map({c: i for i, c in enumerate(classes)}).astype(np.int64)
    holdout["width"], holdout["height"] = d.train_sizes[held, 0], d.train_sizes[held, 1]
    d.train, d.train_sizes, d.sums, d.squares = train.iloc[keep], d.train_sizes[keep], d.sums[keep], d.squares[keep]
    _check_class_counts(d.train["label"], n_folds, f"{where} (after cv.holdout={share})")
    cols = ["id", "label", "target", "width", "height", "path"] + (["group"] if comp.group_column else [])
    return holdout[cols]


def find_test_images(folder: ImageFolder, sample_ids: list[str] | None, sample_where: str) -> tuple[list, list]:
    """(test ids, each one's image path inside `folder`): the sample submission's ids, each found as
    training images are (ImageFolder.find), and every image of `folder` listed; with no sample
    (`sample_ids` None), every image in `folder`, its path being its id. prepare and the bundle's
    prediction (pipeline/bundle.py) read the test images through this one function."""
    if sample_ids is None:
        ids = sorted(folder.paths)
        return ids, ids
    _check_unique(pd.Series(sample_ids), sample_where)
    found = [folder.find(v, f"{sample_where} row {i + 2}") for i, v in enumerate(sample_ids)]
    missing = [i for i, p in enumerate(found) if p is None]
    if missing:
        first = sample_ids[missing[0]]
        raise PipelineError(
            f"{sample_where}: id '{first}' has no image in {folder.files.where(folder.folder)} "
            f"(looked for {first}, {first}{folder.ext} and {first}.*; {len(missing)} such rows)"
        )
    unlisted = sorted(folder.paths - set(found))
    if unlisted:
        raise PipelineError(
            f"{folder.files.where(folder.rel(unlisted[0]))}: test image has no row in {sample_where}"
            f" ({len(unlisted)} such images; check competition.image_ext and test_dir)"
        )
    return list(sample_ids), found


def open_competition(comp: CompetitionConfig) -> CompetitionFiles:
    """The competition's files, a zip's inner folder found."""
    files = CompetitionFiles(comp.source)
    files.set_root(comp.train_csv or comp.sample_submission or comp.train_dir + "/")
    return files


def _read_test(files: CompetitionFiles, comp: CompetitionConfig, classes: list[str], train_paths: set[str]):
    """(sample submission, its format, test ids, each id's image path inside the competition): the
    sample lists the test images; with `sample_submission: null`, every image under test_dir.
    Training images (`train_paths`) in the same folder are not test images."""
    folder = ImageFolder(files, comp.test_dir, comp.image_ext, exclude=train_paths)
    if comp.sample_submission is None:
        ids, found = find_test_images(folder, None, "")
        sample = pd.DataFrame({"id": ids, "label": classes[0]})
        fmt = read_submission_format(sample, classes, "competition.sample_submission: null")
        return sample, fmt, ids, [folder.rel(p) for p in found]
    sample_where = files.where(comp.sample_submission)
    sample = files.read_csv(comp.sample_submission)
    fmt = read_submission_format(sample, classes, sample_where, comp.positive_class, comp.metric)
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
    _check_class_counts(train["label"], n_folds, where)
    if comp.max_train_rows is not None and comp.max_train_rows < len(train):
        train, _ = train_test_split(train, train_size=comp.max_train_rows, stratify=train["label"], random_state=seed)
        train = train.sort_index()
        where = f"{where} (after competition.max_train_rows={comp.max_train_rows})"
        _check_class_counts(train["label"], n_folds, where)
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
        _check_class_counts(train["label"], n_folds, where)
    return _Decoded(train, train_sizes, sums, squares, test_sizes, len(bad_train))


def _write_prepared(
    tmp: Path, d: _Decoded, test: _TestSide, classes: list[str], image_size: int, n_folds: int, group_column: str | None
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
    write_json(tmp / "classes.json", {"classes": classes})
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
    classes = sort_classes(train["label"])
    sample, fmt, test_ids, test_paths = _read_test(files, comp, classes, train_paths)
    test = _TestSide(sample, fmt, test_ids, test_paths, _read_answers(files, comp, fmt.id_column))
    with atomic_dir(out_dir) as tmp:
        decoded = _decode_all(
            files, train, test, tmp, image_size, resize, workers or os.cpu_count() or 1, skip_bad_images, n_folds, where
        )
        if holdout:
            decoded.holdout = _split_holdout(decoded, tmp, classes, comp, holdout, n_folds, seed, where)
        decoded.train = _add_targets_and_folds(decoded.train, classes, comp, n_folds, seed)
        _write_prepared(tmp, decoded, test, classes, image_size, n_folds, comp.group_column)
    return {
        "source": str(source),
        "n_train": len(decoded.train),
        "n_test": len(test_ids),
        "n_holdout": 0 if decoded.holdout is None else len(decoded.holdout),
        "n_classes": len(classes),
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
