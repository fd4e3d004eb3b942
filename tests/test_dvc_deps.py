"""dvc.yaml's code deps are exactly the project modules each stage runs, so that editing a module
reruns the stages that import it and no other (a TTA view reruns predict, never train)."""

import ast
import os
import re
import shutil
import sys
from pathlib import Path

import pandas as pd
import yaml

from pipeline.__main__ import MODULES
from tests.conftest import write_competition
from tests.test_dvc_pipeline import _run, _set_params, _status

ROOT = Path(__file__).resolve().parents[1]


def _file(module: str) -> Path | None:
    """pipeline.a.b -> pipeline/a/b.py or pipeline/a/b/__init__.py; None outside the project."""
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported(path: Path) -> set[str]:
    """Project modules `path` imports anywhere in its body, lazy imports inside functions included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from pipeline import distributed`
    return {m for m in found if m.split(".")[0] == "pipeline" and _file(m)}


def stage_modules(module: str) -> set[str]:
    """Every project file that running `module` executes: its imports, theirs, and each package's
    __init__.py on the way, as paths relative to the repository root."""
    seen, todo = set(), [module, "pipeline.__main__"]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            path = _file(".".join(parts[:i]))
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(_imported(path))
    return {str(p.relative_to(ROOT)) for p in seen}


def test_every_stage_lists_exactly_the_code_it_runs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    problems = []
    for name, stage in stages.items():
        body = stage.get("do", stage)
        command = re.match(r"python -m pipeline (\w+)", body["cmd"]).group(1)
        listed = {d for d in body["deps"] if d.startswith("pipeline/")}
        needed = stage_modules(MODULES[command])
        if needed - listed:
            problems.append(f"{name}: deps miss {sorted(needed - listed)}")
        if listed - needed:
            problems.append(f"{name}: deps list {sorted(listed - needed)}, which it does not import")
    assert not problems, "\n".join(problems)


def test_the_import_walk_follows_lazy_and_package_imports():
    train = stage_modules("pipeline.cli.train")
    assert {"pipeline/__init__.py", "pipeline/cli/__init__.py", "pipeline/__main__.py"} <= train
    assert "pipeline/distributed.py" in train  # `from pipeline import distributed`
    assert "pipeline/inference.py" in train and "pipeline/predict.py" not in train


def test_a_competition_outside_data_raw_is_a_tracked_dependency_of_prepare(tmp_path):
    """competition.source is prepare's dependency wherever it lies: editing it reruns prepare."""
    elsewhere = write_competition(tmp_path / "elsewhere" / "comp", n_per_class=4, n_test=3)
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(ROOT / name, repo)
    shutil.copytree(ROOT / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    _set_params(
        repo,
        competition={"source": str(elsewhere)},
        prepare={"image_size": 8, "workers": 1},
        cv={"n_folds": 2},
        tracking={"enabled": False},
    )
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
    }
    _run(["git", "init", "-q"], repo, env)
    _run(["dvc", "init", "-q"], repo, env)
    _run(["dvc", "repro", "prepare"], repo, env)
    assert "prepare" not in _status(repo, env)
    train = pd.read_csv(elsewhere / "train.csv", dtype=str)
    train.loc[0, "label"] = train.loc[len(train) - 1, "label"]  # a relabelled row, outside the repository
    train.to_csv(elsewhere / "train.csv", index=False)
    changed = _status(repo, env)["prepare"]
    assert {"changed deps": {str(elsewhere): "modified"}} in changed
