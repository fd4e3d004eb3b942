"""Presets: small named overrides of params.yaml in configs/presets/<name>.yaml.

    python -m pipeline preset cifar10-cpu     # merge configs/presets/cifar10-cpu.yaml into params.yaml
    make run PRESET=cifar10-cpu               # the same, then `dvc repro`

A competition in data/raw/ that git and DVC do not track yet is put under DVC (`dvc add`). A backbone whose
`pretrained` is `weights/<model>` gets that folder converted from its offline package when it is missing.

A preset file holds only the keys it changes, nested as in params.yaml. Mappings merge key by key;
lists and values replace; `train.backbones` is replaced whole, because a preset that names
backbones means exactly those. params.yaml keeps its comments; `git checkout params.yaml` undoes it.
"""

from __future__ import annotations

import copy
import io
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.config import ConfigError, Params, parse_params
from pipeline.io import atomic_write_text
from pipeline.weights import provide

PRESETS = Path("configs/presets")
REPLACED_WHOLE = {("train", "backbones")}


def list_presets(folder: str | Path = PRESETS) -> list[str]:
    return sorted(p.stem for p in Path(folder).glob("*.yaml"))


def load_preset(name: str, folder: str | Path = PRESETS) -> dict:
    """The preset's overrides, checked against the params schema (unknown keys name the file)."""
    path = Path(folder) / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: no such preset (presets: {', '.join(list_presets(folder)) or 'none'})")
    try:
        delta = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
    parse_params(delta, source=str(path))  # every key exists and has the right type
    return delta


def merge(base, delta, path: tuple = ()):
    """`delta` applied over `base` in place (see the module docstring); returns `base`."""
    for key, value in delta.items():
        here = (*path, key)
        if isinstance(value, dict) and isinstance(base.get(key), dict) and here not in REPLACED_WHOLE:
            merge(base[key], value, here)
        else:
            base[key] = copy.deepcopy(value)
    return base


def apply_preset(name: str, params_path: str | Path = "params.yaml", folder: str | Path = PRESETS) -> Params:
    """Merge preset `name` into `params_path`, keeping its comments; validate before writing."""
    from ruamel.yaml import YAML

    delta = load_preset(name, folder)
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    params_path = Path(params_path)
    doc = rt.load(params_path.read_text()) or {}
    merge(doc, delta)
    out = io.StringIO()
    rt.dump(doc, out)
    resolved = parse_params(yaml.safe_load(out.getvalue()) or {}, source=f"{params_path} with preset {name}")
    atomic_write_text(params_path, out.getvalue())
    return resolved


def track_with_dvc(source: str) -> Path | None:
    """`dvc add` the competition at `source` when it lies in data/raw/ and neither git nor DVC tracks it
    yet: a .dvc file to commit, so `dvc pull` restores it on a fresh clone and `dvc exp run --queue`
    finds it in its copy. Returns the .dvc file written, else None."""
    path = Path(source.rstrip("/"))
    dvc_file = path.with_name(path.name + ".dvc")
    if not path.exists() or dvc_file.exists() or not path.resolve().is_relative_to(Path("data/raw").resolve()):
        return None
    in_git = subprocess.run(["git", "ls-files", "--", str(path)], capture_output=True, text=True)
    if in_git.returncode != 0 or in_git.stdout.strip():  # not a git repository, or committed (the digits demo)
        return None
    out = subprocess.run([sys.executable, "-m", "dvc", "add", "-q", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"{path}: `dvc add` failed: {last}")
    return dvc_file


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="a file name (without .yaml) in configs/presets/")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    params = apply_preset(args.name, args.params)
    print(
        f"preset {args.name} applied to {args.params}: backbones {', '.join(params.train.backbones)}, "
        f"{params.cv.n_folds} folds, competition {params.competition.source}"
    )
    for folder in provide(params):
        print(f"{folder}/: ImageNet weights converted from their offline package (python -m pipeline weights)")
    dvc_file = track_with_dvc(params.competition.source)
    if dvc_file:
        print(f"dvc add {params.competition.source}: commit {dvc_file} (`dvc push` stores the data in your remote)")
