"""A competition's raw files, unpacked in a folder or still inside its .zip, and its images found from
the ids and paths of its CSVs, every path kept inside the competition's folder. The prepare stage reads
a competition through these; the bundle's runtime reads a hidden test folder the same way."""

from __future__ import annotations

import io
import os
import posixpath
import zipfile
from pathlib import Path

import pandas as pd

from pipeline.config import CompetitionConfig
from pipeline.errors import PipelineError

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

    def top_files(self) -> list[str]:
        """The names of the files at the competition's top (not in a folder)."""
        if self._zip is not None:
            names = [n[len(self.prefix) :] for n in self._names if n.startswith(self.prefix)]
            return sorted(n for n in names if n and "/" not in n)
        return sorted(p.name for p in self.source.iterdir() if p.is_file())

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


def check_unique(ids: pd.Series, where: str) -> None:
    dup = ids[ids.duplicated()]
    if len(dup):
        row = int(dup.index[0]) + 2  # 1-based, after the header line
        raise PipelineError(f"{where}: duplicate id '{dup.iloc[0]}' (row {row})")


def find_test_images(folder: ImageFolder, sample_ids: list[str] | None, sample_where: str) -> tuple[list, list]:
    """(test ids, each one's image path inside `folder`): the sample submission's ids, each found as
    training images are (ImageFolder.find), and every image of `folder` listed; with no sample
    (`sample_ids` None), every image in `folder`, its path being its id. prepare and the bundle's
    prediction (pipeline/bundle.py) read the test images through this one function."""
    if sample_ids is None:
        ids = sorted(folder.paths)
        return ids, ids
    check_unique(pd.Series(sample_ids), sample_where)
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
