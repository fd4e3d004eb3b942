"""Presets: small overrides of params.yaml, named (configs/presets/<name>.yaml) or a file anywhere.

    python -m pipeline preset cifar10-cpu     # merge configs/presets/cifar10-cpu.yaml into params.yaml
    python -m pipeline preset ~/my-comp.yaml  # a preset file of one's own (a path: it holds a / or ends .yaml)
    make run PRESET=cifar10-cpu               # the same, then `dvc repro`

A competition in data/raw/ that git and DVC do not track yet is put under DVC (`dvc add`). A backbone whose
`pretrained` is `weights/<model>` gets that folder converted from its offline package when it is missing.

A preset file holds only the keys it changes, nested as in params.yaml. Mappings merge key by key;
lists and values replace; `train.backbones` is replaced whole, because a preset that names
backbones means exactly those. Only the lines of the keys a preset sets change: each such key's lines (its
line, its inline comment and the more indented lines after it: its comment's continuation, or its children)
become the preset's own lines for it, comments included; every other line of params.yaml stays byte for byte.
`git checkout params.yaml` undoes it.
"""

from __future__ import annotations

import copy
import io
import re
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


def preset_path(name: str, folder: str | Path = PRESETS) -> Path:
    """A preset's file: `name` itself when it is a path (holds a / or ends .yaml), else `folder`/<name>.yaml."""
    if "/" in name or name.endswith((".yaml", ".yml")):
        return Path(name).expanduser()
    return Path(folder) / f"{name}.yaml"


def load_preset(name: str, folder: str | Path = PRESETS) -> dict:
    """The preset's overrides, checked against the params schema (unknown keys name the file)."""
    path = preset_path(name, folder)
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


_KEY = re.compile(r"^( *)([^\s#:'\"-][^:#]*?|'[^']*'|\"[^\"]*\"):(?:\s|$)")


def _key_lines(lines: list[str], start: int, end: int) -> dict[str, tuple[int, int, int]]:
    """The keys of the mapping held in lines [start, end): key -> (first line, end line, indent). A key's lines
    run to the next line, comment or key at its indent or less (blank lines before that left out)."""
    keys, indent = {}, None
    i = start
    while i < end:
        m = _KEY.match(lines[i])
        if m and (indent is None or len(m.group(1)) == indent):
            indent = len(m.group(1))
            j, last = i + 1, i + 1
            while j < end:
                text = lines[j]
                if text.strip():
                    if len(text) - len(text.lstrip(" ")) <= indent:
                        break
                    last = j + 1
                j += 1
            keys[m.group(2).strip("'\"")] = (i, last, indent)
            i = last
        else:
            i += 1
    return keys


def _block(lines: list[str], path: tuple, start: int = 0, end: int | None = None):
    """(first line, end line, indent) of the key at `path` in `lines`, or None."""
    end = len(lines) if end is None else end
    found = _key_lines(lines, start, end).get(path[0])
    if found is None or len(path) == 1:
        return found
    return _block(lines, path[1:], found[0] + 1, found[1])


def _leaves(delta: dict, base: dict, path: tuple = ()):
    """The paths the preset sets as `merge` applies them: a value, a list or a mapping replaced whole."""
    for key, value in delta.items():
        here = (*path, key)
        if isinstance(value, dict) and isinstance(base.get(key), dict) and here not in REPLACED_WHOLE:
            yield from _leaves(value, base[key], here)
        else:
            yield here


def _edit_lines(params_text: str, preset_text: str, delta: dict) -> str | None:
    """params.yaml with each key the preset sets replaced by the preset's own lines for it (re-indented), or
    inserted at the end of its parent mapping; None where a key cannot be placed that way (the caller falls
    back to a full rewrite)."""
    lines, preset = params_text.splitlines(keepends=True), preset_text.splitlines(keepends=True)
    base = yaml.safe_load(params_text) or {}
    for path in _leaves(delta, base):
        new = _block(preset, path)
        if new is None:
            return None
        block = preset[new[0] : new[1]]
        old = _block(lines, path)
        if old is not None:
            shift, at, stop = old[2] - new[2], old[0], old[1]
        else:
            parent = _block(lines, path[:-1]) if len(path) > 1 else None
            if parent is None:
                return None
            children = _key_lines(lines, parent[0] + 1, parent[1])
            indent = next(iter(children.values()))[2] if children else parent[2] + 2
            shift, at, stop = indent - new[2], parent[1], parent[1]
        pad = " " * max(shift, 0)
        block = [pad + b[max(-shift, 0) :] if b.strip() else b for b in block]
        block = [b if b.endswith("\n") else b + "\n" for b in block]
        lines[at:stop] = block
    return "".join(lines)


def apply_preset(name: str, params_path: str | Path = "params.yaml", folder: str | Path = PRESETS) -> Params:
    """Merge preset `name` into `params_path`, changing only the lines of the keys it sets (see the module
    docstring); checked against the merge of the parsed files, and validated, before writing."""
    delta = load_preset(name, folder)
    params_path = Path(params_path)
    text = params_path.read_text()
    expected = merge(yaml.safe_load(text) or {}, delta)
    out = _edit_lines(text, preset_path(name, folder).read_text(), delta)
    if out is None or yaml.safe_load(out) != expected:  # a layout the line editor does not know: rewrite it all
        out = _rewrite(text, delta)
    resolved = parse_params(yaml.safe_load(out) or {}, source=f"{params_path} with preset {name}")
    atomic_write_text(params_path, out)
    return resolved


def _rewrite(text: str, delta: dict) -> str:
    """params.yaml merged with `delta` and dumped whole by ruamel (comments kept, other lines reformatted)."""
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    doc = rt.load(text) or {}
    merge(doc, delta)
    out = io.StringIO()
    rt.dump(doc, out)
    return out.getvalue()


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
    parser.add_argument("name", help="a file name (without .yaml) in configs/presets/, or a preset file's path")
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
