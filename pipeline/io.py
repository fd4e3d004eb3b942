"""Atomic writes: a stage either leaves its complete outputs or the previous ones, never half of them,
also when it is stopped (Ctrl-C, SIGTERM: `stop_on_signals`, `uninterrupted`). And each stage's clock:
`record_stage` (reports/timing/, read by the timing stage) and `StageProgress` (a plain progress line
with an ETA)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.errors import PipelineError


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, SLURM, docker stop, a cluster's pre-emption), raised like Ctrl-C's
    KeyboardInterrupt so that the same cleanup runs: scratch outputs removed, previous outputs kept,
    MLflow runs ended FAILED, the resume state kept for the next run."""


_stop = {"depth": 0, "pending": None}  # inside `uninterrupted` blocks; a stop that waits for their end


def repository_root() -> Path:
    """The repository the pipeline was started from, where MLflow's and Optuna's default stores live.
    DVC sets DVC_ROOT to it for every stage, also under `dvc exp run --queue` / `--temp`, which run in
    a throwaway copy under .dvc/tmp/exps (a store there would vanish with it); else the working directory."""
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


def _on_stop_signal(signum, frame) -> None:
    stop = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    if _stop["depth"]:
        _stop["pending"] = stop
        return
    raise stop()


def stop_on_signals() -> dict:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt / `Terminated`, except inside `uninterrupted` blocks,
    whose end they wait for. Returns the previous handlers (for `signal.signal`)."""
    return {sig: signal.signal(sig, _on_stop_signal) for sig in (signal.SIGINT, signal.SIGTERM)}


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """A block that a stop signal does not cut in half (a folder swap, a database write): the stop is
    raised when the block ends."""
    _stop["depth"] += 1
    try:
        yield
    finally:
        _stop["depth"] -= 1
        if not _stop["depth"] and _stop["pending"] is not None:
            stop, _stop["pending"] = _stop["pending"], None
            raise stop()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a scratch folder beside `path`; on success it replaces `path` in one rename.

    On any exception the scratch folder is removed and `path` is left as it was. Scratch names
    carry the process id, so processes writing the same folder (tune workers) do not collide.
    """
    path = Path(path)
    remove_dead_scratch(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f"{path.name}.old{os.getpid()}")
    with uninterrupted():  # stopped between the two renames, there would be no `path` at all
        for _ in range(10):  # another process may swap its own version in between: last writer wins
            try:
                if path.exists():
                    path.rename(old)
                tmp.rename(path)
                break
            except (FileNotFoundError, FileExistsError, OSError):
                continue
    shutil.rmtree(old, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


def remove_dead_scratch(path: Path) -> None:
    """Remove the scratch folders and files left beside `path` (<name>.tmp<pid>, <name>.old<pid>) by
    processes that were killed before they could clean up (SIGKILL, out of memory, a lost machine)."""
    if not path.parent.is_dir():
        return
    for other in path.parent.iterdir():
        for mark in (".tmp", ".old"):
            pid = other.name[len(path.name) + len(mark) :]
            if other.name.startswith(path.name + mark) and pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(other) if other.is_dir() and not other.is_symlink() else other.unlink()


def atomic_save(path: str | Path, write: Callable[[Path], None]) -> None:
    """`write(scratch)` a file beside `path` (<name>.tmp<pid>), then rename it over `path`: readers see
    the old file or the new one, never half of it (a checkpoint, a cache, a JSON report)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_scratch(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def save_tensors(tensors: dict, path: str | Path) -> None:
    """safetensors' save_file, the file then given the mode every other file gets (0666 less the umask:
    save_file creates it 0600, which a shared bundle or export should not be)."""
    from safetensors.torch import save_file

    save_file(tensors, path)
    give_usual_mode(path)


def give_usual_mode(path: str | Path) -> None:
    """Set `path`'s mode to what open() would have given a new file under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_save(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    """A JSON file the pipeline wrote; one cut short or damaged is a PipelineError naming it, its line and column."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except UnicodeDecodeError:
        raise PipelineError(f"{path}: not valid JSON (not UTF-8 text)") from None


def load_checkpoint(path: str | Path, remedy: str) -> dict:
    """A checkpoint this pipeline wrote, loaded with torch.load(weights_only=True): nothing is unpickled.
    A file cut short (an interrupted copy, a full disk) or damaged is a PipelineError naming it and `remedy`."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip, pickle and OS errors: a cut or damaged file gives many kinds
        reason = exc.__class__.__name__ + "".join(f": {line[:160]}" for line in str(exc).strip().splitlines()[:1])
        raise PipelineError(f"{path}: cannot be read, truncated or corrupt ({reason}); {remedy}") from None
    if not isinstance(obj, dict):
        raise PipelineError(f"{path}: not a checkpoint of this pipeline ({type(obj).__name__}); {remedy}")
    return obj


_clock = {"started": time.time()}  # restarted by `python -m pipeline` before it imports the stage


def start_stage_clock() -> None:
    _clock["started"] = time.time()


def stage_started() -> float:
    """When this stage started (unix time): its imports and work count, Python's own start does not."""
    return _clock["started"]


def record_stage(path: str | Path, name: str) -> None:
    """`path` (reports/timing/<name>.json, the stage's DVC output): when the stage started and ended, and its
    seconds: the actual side of the plan (`python -m pipeline timing`)."""
    now = time.time()
    write_json(
        path,
        {"stage": name, "started": stage_started(), "finished": now, "seconds": round(now - stage_started(), 2)},
    )


def _clock_text(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


class StageProgress:
    """A stage's progress in units of work (epochs, trials) as one plain line, the same on a terminal
    and in a CI, SLURM or `dvc repro` log: `train@resnet10t: 12/25 epochs (48%), 0:31 elapsed, ETA 0:34`.
    Units may be fractional (a planned 6.04 epochs: the last counts 0.04), so the ETA of a short last epoch
    is short. The ETA extrapolates the units this process has run (work kept from a killed run counts as
    done, not as speed)."""

    def __init__(self, name: str, total: float, unit: str):
        self.name, self.total, self.unit = name, total if total > 0 else 1, unit
        self.done = self.ran = 0.0
        self.started = time.time()

    def skip(self, n: float = 1) -> None:
        """Units done by an earlier run."""
        self.done += n

    def step(self, n: float = 1) -> str:
        """Count `n` units run now; return the progress line."""
        self.done, self.ran = self.done + n, self.ran + n
        elapsed = time.time() - self.started
        left = max(self.total - self.done, 0)
        eta = _clock_text(elapsed / self.ran * left) if self.ran else "?"
        done = min(self.done, self.total)
        return (
            f"{self.name}: {round(done, 2):g}/{round(self.total, 2):g} {self.unit} "
            f"({int(100 * done / self.total + 1e-9)}%), {_clock_text(elapsed)} elapsed, ETA {eta}"
        )


def recorded(path: str | Path) -> dict | None:
    """The last record `record_stage` wrote at `path` ({stage, started, finished, seconds}), or None."""
    return read_json(path) if Path(path).exists() else None


def seconds_so_far(earlier: dict[str, Path], this: str) -> dict[str, float]:
    """Seconds of the `earlier` stages (name -> its record's path) as recorded (0: never recorded), and of
    `this` one so far."""
    done = {stage: (recorded(path) or {"seconds": 0.0})["seconds"] for stage, path in earlier.items()}
    return {**done, this: time.time() - stage_started()}
