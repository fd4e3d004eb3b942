"""The house rules a newcomer relies on: a README that is a recipe, short functions, thin doors that
never import each other, and a backbone resolved by one library function."""

import ast
from pathlib import Path

import pytest
import yaml

from pipeline.backbone import Backbone, apply_plan, planned, resolve_backbone, resume_dir, run_record
from pipeline.config import parse_params
from pipeline.errors import PipelineError
from pipeline.paths import RunPaths

ROOT = Path(__file__).resolve().parents[1]
DOORS = sorted((ROOT / "pipeline" / "cli").glob("*.py"))


def test_the_readme_is_a_recipe_of_at_most_300_lines_of_at_most_200_characters():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300
    long = [i + 1 for i, line in enumerate(lines) if len(line) > 200]
    assert not long, f"README.md lines over 200 characters: {long}"


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_no_function_in_the_package_is_over_60_lines_and_no_door_over_40():
    found = [
        (f"{p.relative_to(ROOT)}:{name}", n, p.parent.name == "cli" and name == "main")
        for p in (ROOT / "pipeline").rglob("*.py")
        for name, n in _functions(p)
    ]
    over = [f"{where} ({n} lines)" for where, n, door in found if n > (40 if door else 60)]
    assert not over, over


def test_no_door_imports_another_door():
    doors = {f"pipeline.cli.{p.stem}" for p in DOORS if p.stem != "__init__"}
    crossing = []
    for p in DOORS:
        for node in ast.walk(ast.parse(p.read_text())):
            names = (
                [node.module]
                if isinstance(node, ast.ImportFrom) and node.module
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            crossing += [f"{p.name} -> {n}" for n in names if n in doors]
    assert not crossing, crossing


STAGE_MODULES = ("prepare", "plan", "tune", "train", "predict", "ensemble", "analyze", "timing")


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, lazy imports inside functions included (`from pipeline import x` as pipeline.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return found


def test_a_stage_module_is_imported_by_its_own_door_only():
    """Shared pieces (a competition's files, the decode cache, TTA views, ensemblers, a fold's setup) live in
    modules of their own; a stage's module is the library of its door, so editing it reruns that stage only."""
    crossing = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for stage in STAGE_MODULES:
            if f"pipeline.{stage}" in _imports(path) and rel not in (
                f"pipeline/cli/{stage}.py",
                f"pipeline/{stage}.py",
            ):
                crossing.append(f"{rel} imports pipeline.{stage}")
    assert not crossing, crossing


def test_the_stage_import_check_sees_a_lazy_import(tmp_path):
    sneaky = tmp_path / "x.py"
    sneaky.write_text("def f():\n    from pipeline import predict\n    from pipeline.train import train_stage\n")
    assert {"pipeline.predict", "pipeline.train"} <= _imports(sneaky)


# The only files where the single-label assumption may be code: the tasks (their package's shared code calls
# timm's Mixup with its `num_classes`), and the timm model code they call (timm's own `num_classes` head
# argument). Everything else asks the task (pipeline/tasks).
TARGET_CODE_ALLOWED = {
    "pipeline/tasks/__init__.py",
    "pipeline/tasks/single_label.py",
    "pipeline/tasks/multilabel.py",
    "pipeline/models.py",
}
TARGET_NAMES = {"softmax", "log_softmax", "cross_entropy", "num_classes"}


def _class_axis_argmax(node: ast.Call) -> bool:
    """`x.argmax(1)`, `x.argmax(-1)`, `x.argmax(axis=1)`, `np.argmax(x, axis=-1)`: an argmax over classes."""
    func = node.func
    if not (isinstance(func, ast.Attribute) and func.attr == "argmax"):
        return False
    axes = [kw.value for kw in node.keywords if kw.arg in ("axis", "dim")]
    positional = (
        node.args[1:] if isinstance(func.value, ast.Name) and func.value.id in ("np", "numpy", "torch") else node.args
    )
    axes += positional[:1]
    return any(isinstance(a, ast.Constant) and a.value == 1 for a in axes) or any(
        isinstance(a, ast.UnaryOp) and isinstance(a.op, ast.USub) and getattr(a.operand, "value", None) == 1
        for a in axes
    )


def single_label_code(source: str) -> list[str]:
    """Where `source` uses softmax, log_softmax, cross_entropy or num_classes as code (a name, an attribute,
    an argument or parameter name), or takes a class-axis argmax; comments and strings do not count."""
    found = []
    for node in ast.walk(ast.parse(source)):
        hit = (
            (isinstance(node, ast.Name) and node.id in TARGET_NAMES and node.id)
            or (isinstance(node, ast.Attribute) and node.attr in TARGET_NAMES and node.attr)
            or (isinstance(node, ast.keyword) and node.arg in TARGET_NAMES and node.arg)
            or (isinstance(node, ast.arg) and node.arg in TARGET_NAMES and node.arg)
            or (isinstance(node, ast.Call) and _class_axis_argmax(node) and "argmax over classes")
        )
        if hit:
            found.append(f"line {getattr(node, 'lineno', '?')}: {hit}")
    return found


def test_the_single_label_assumption_is_code_only_in_the_task_and_the_model_code_it_calls():
    found = {
        path.relative_to(ROOT).as_posix(): single_label_code(path.read_text())
        for path in sorted((ROOT / "pipeline").rglob("*.py"))
        if path.relative_to(ROOT).as_posix() not in TARGET_CODE_ALLOWED
    }
    assert not {k: v for k, v in found.items() if v}, found


def test_the_single_label_check_sees_each_form_and_not_a_comment_or_an_unrelated_argmax():
    source = (
        "import numpy as np\nimport torch.nn.functional as F\n# softmax in a comment\ns = 'log_softmax'\n"
        "a = p.argmax(1)\nb = np.argmax(p, axis=-1)\nc = values.argmax()\nd = F.cross_entropy(x, y)\n"
        "m = create(num_classes=3)\ndef f(num_classes): pass\ne = torch.log_softmax(x, dim=1)\n"
    )
    assert single_label_code(source) == [
        "line 5: argmax over classes",
        "line 6: argmax over classes",
        "line 8: cross_entropy",
        "line 9: num_classes",
        "line 10: num_classes",
        "line 11: log_softmax",
    ]


def _params(**train):
    return parse_params(
        {
            "train": {"epochs": 6, "backbones": {"net": {"model": "test_resnet", **train}}},
            "tracking": {"enabled": False},
        }
    )


def test_resolve_backbone_merges_params_over_tuned_over_shared_and_applies_the_plan(tmp_path):
    run = RunPaths(tmp_path)
    run.tuning("net").mkdir(parents=True)
    (run.tuning("net") / "best_params.yaml").write_text(yaml.safe_dump({"params": {"lr": 0.5, "batch_size": 7}}))
    b = resolve_backbone(_params(lr=0.01), "net", 24, tuning=run.tuning("net"))
    assert (b.model_name, b.settings.lr, b.settings.batch_size, b.image_size) == ("test_resnet", 0.01, 7, 24)
    assert b.tuned == {"lr": 0.5, "batch_size": 7} and b.settings.augment  # the default augmentation, resolved
    assert resolve_backbone(_params(), "net", 24).settings.batch_size != 7  # no tuning folder: untuned
    with pytest.raises(PipelineError, match=r"plan/net.json: not found; budget.minutes needs the plan stage"):
        planned(b, run.plan_dir)
    run.plan_dir.mkdir()
    (run.plan_dir / "net.json").write_text('{"epochs": 12, "val_every": 3}')
    assert (planned(b, run.plan_dir).settings.epochs, planned(b, run.plan_dir).settings.val_every) == (12, 3)
    assert apply_plan(b.settings, None) is b.settings
    # precision: auto takes the plan's choice (a DVC-tracked file), with or without a budget; epochs only with one
    (run.plan_dir / "net.json").write_text('{"epochs": 12, "val_every": 3, "precision": "bf16"}')
    auto = planned(resolve_backbone(_params(precision="auto"), "net", 24), run.plan_dir, budget=False)
    assert (auto.settings.precision, auto.settings.epochs) == ("bf16", 6)
    assert planned(b, run.plan_dir).settings.precision is None  # not auto: the plan's record changes nothing


def test_resolve_backbone_names_the_key_of_a_bad_setting():
    with pytest.raises(PipelineError, match=r"params.yaml: train.backbones.net"):
        resolve_backbone(_params(model="no_such_net_xyz"), "net", 24)


def test_the_resume_folder_changes_with_a_setting_and_not_with_the_device(tmp_path):
    import dataclasses

    import pandas as pd
    import torch

    from pipeline.data import PreparedData

    data = PreparedData(
        pd.DataFrame({"id": ["a", "b"], "fold": [0, 1], "target": [0, 1]}),
        pd.DataFrame({"id": []}),
        ["x", "y"],
        None,
        None,
        {},
    )
    b = Backbone("net", "test_resnet", None, resolve_backbone(_params(), "net", 24).settings, 24, {})
    here = resume_dir(run_record(b, data, torch.device("cpu")), data, tmp_path)
    assert here == resume_dir(run_record(b, data, torch.device("cuda")), data, tmp_path)
    other = dataclasses.replace(b, settings=dataclasses.replace(b.settings, lr=b.settings.lr * 2))
    assert resume_dir(run_record(other, data, torch.device("cpu")), data, tmp_path) != here
