"""The decoded image cache: every image decoded once, in worker processes, straight into a uint8
.npy file (N, S, S, 3) that later stages memory-map, with per-image pixel sums for normalisation
statistics. The prepare stage writes the competition's caches; the bundle's runtime, the hidden test set's."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.competition import CompetitionFiles
from pipeline.errors import PipelineError
from pipeline.images import decode_image
from pipeline.io import atomic_save

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
