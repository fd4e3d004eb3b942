"""What pip installs: every package the code imports is declared, and the console script works."""

import ast
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

from pipeline.__main__ import MODULES

ROOT = Path(__file__).resolve().parents[1]


def _imported_top_level_names() -> set[str]:
    names = set()
    for path in (ROOT / "pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"pipeline", "__future__"}


def test_every_imported_package_is_a_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {Requirement(r).name.lower().replace("_", "-") for r in project["dependencies"]}
    distributions = packages_distributions()
    undeclared = {}
    for name in _imported_top_level_names():
        dists = {d.lower().replace("_", "-") for d in distributions.get(name, [name])}
        if not dists & declared:
            undeclared[name] = sorted(dists)
    assert not undeclared, f"imported but not in pyproject.toml's dependencies: {undeclared}"
    assert {"matplotlib", "scipy"} <= declared  # imported directly; they used to arrive only through mlflow


def test_the_kip_console_script_lists_every_command_and_exits_0():
    kip = Path(sys.executable).parent / "kip"
    out = subprocess.run([kip, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert all(f"python -m pipeline {m}" in out.stdout for m in MODULES)
    bare = subprocess.run([sys.executable, "-m", "pipeline"], capture_output=True, text=True, timeout=60)
    assert bare.returncode == 2 and bare.stderr.startswith("usage: kip {prepare,tune,plan,")
