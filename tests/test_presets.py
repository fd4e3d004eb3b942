"""Presets: every shipped one is a valid override of the params schema, and applying one keeps
params.yaml's comments and changes exactly what the preset names."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import __main__ as cli
from pipeline.config import ConfigError, Params, load_params, parse_params, to_dict
from pipeline.presets import list_presets, load_preset, merge, track_with_dvc

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "configs" / "presets"


def test_the_presets_the_readme_names_are_shipped():
    assert {"demo", "cpu-fast", "cifar10-cpu", "cifar10-64px", "photo-cpu", "gpu-best"} <= set(list_presets(PRESETS))


@pytest.mark.parametrize("name", list_presets(PRESETS))
def test_every_preset_key_exists_in_the_params_schema(name):
    delta = load_preset(name, PRESETS)  # raises on an unknown key or a wrong type
    resolved = parse_params(merge(to_dict(Params()), delta))
    flat_delta = _leaves(delta)
    flat_resolved = _leaves(to_dict(resolved))
    for key in flat_delta:  # the preset's values reach the resolved params
        assert any(k == key or k.startswith(key + ".") for k in flat_resolved), key


def _leaves(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_a_preset_with_an_unknown_key_is_refused_naming_the_file(tmp_path):
    (tmp_path / "typo.yaml").write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown key 'train.epoch'"):
        load_preset("typo", tmp_path)
    with pytest.raises(ConfigError, match="no such preset"):
        load_preset("missing", tmp_path)


def test_merge_replaces_backbones_whole_and_merges_other_mappings():
    base = {"train": {"backbones": {"a": {}, "b": {"lr": 1}}, "epochs": 5, "augment": [1, 2]}, "cv": {"n_folds": 5}}
    merge(base, {"train": {"backbones": {"c": {}}, "augment": [3]}, "cv": {"seed": 1}})
    assert base == {"train": {"backbones": {"c": {}}, "epochs": 5, "augment": [3]}, "cv": {"n_folds": 5, "seed": 1}}


def test_applying_cpu_fast_changes_only_its_keys_and_keeps_comments(tmp_path, monkeypatch):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(PRESETS, tmp_path / "configs" / "presets")
    monkeypatch.chdir(tmp_path)
    before = load_params("params.yaml")
    assert cli.main(["preset", "cpu-fast"]) == 0
    after = load_params("params.yaml")
    assert after.cv.n_folds == 3 and after.competition.max_train_rows == 10000
    assert after.tta.candidates == ["none", "hflip", "five_crop"]
    assert after.train == before.train and after.prepare == before.prepare  # untouched
    text = (tmp_path / "params.yaml").read_text()
    assert "# Every key is optional" in text and "# one train@<name> and predict@<name>" in text
    assert cli.main(["preset", "cpu-fast"]) == 0  # idempotent
    assert (tmp_path / "params.yaml").read_text() == text
    assert cli.main(["preset", "nope"]) == 1


def test_a_competition_in_data_raw_is_put_under_dvc_once_and_a_committed_one_is_left(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], check=True)
    (tmp_path / "data/raw/demo").mkdir(parents=True)
    (tmp_path / "data/raw/demo/MARKER").write_text("x")
    subprocess.run(["git", "add", "data/raw/demo/MARKER"], check=True)
    (tmp_path / "data/raw/comp.zip").write_bytes(b"PK\x05\x06" + bytes(18))
    assert track_with_dvc("data/raw/comp.zip") == Path("data/raw/comp.zip.dvc")
    assert "path: comp.zip" in (tmp_path / "data/raw/comp.zip.dvc").read_text()
    assert track_with_dvc("data/raw/comp.zip") is None  # already under DVC
    assert track_with_dvc("data/raw/demo/") is None and not (tmp_path / "data/raw/demo.dvc").exists()  # in git
    assert track_with_dvc(str(tmp_path.parent)) is None  # outside data/raw: the user's to decide


def test_a_preset_file_outside_configs_applies_and_only_the_lines_of_its_keys_change(tmp_path, monkeypatch):
    """Every untouched line of params.yaml stays byte for byte: a changed key's lines (its inline comment and
    the comment lines after it) become the preset's own, a mapping replaced whole takes the preset's lines."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    before = (tmp_path / "params.yaml").read_text().splitlines(keepends=True)
    own = tmp_path / "elsewhere" / "my-comp.yaml"
    own.parent.mkdir()
    own.write_text(
        "# my competition\n"
        "competition:\n"
        "  metric: log_loss   # the host's\n"
        "train:\n"
        "  backbones:\n"
        "    resnet10t: {}     # only this one\n"
        "  monitor: null\n"
    )
    assert cli.main(["preset", str(own)]) == 0
    after = (tmp_path / "params.yaml").read_text().splitlines(keepends=True)
    metric = next(i for i, line in enumerate(before) if line.startswith("  metric: accuracy"))
    backbones = next(i for i, line in enumerate(before) if line.startswith("  backbones:"))
    monitor = next(i for i, line in enumerate(before) if line.startswith("  monitor: accuracy"))

    def end(i):  # the key's lines: the more indented lines after it
        j = i + 1
        while before[j].startswith("    "):
            j += 1
        return j

    expected = (
        before[:metric]
        + ["  metric: log_loss   # the host's\n"]
        + before[end(metric) : backbones]
        + ["  backbones:\n", "    resnet10t: {}     # only this one\n"]
        + before[end(backbones) : monitor]
        + ["  monitor: null\n"]
        + before[end(monitor) :]
    )
    assert after == expected
    assert end(metric) - metric > 1 and end(monitor) - monitor > 1  # comment lines that went with their key
    params = load_params("params.yaml")
    assert list(params.train.backbones) == ["resnet10t"] and params.train.monitor == "log_loss"  # null: the proxy


def test_a_key_params_yaml_lacks_is_added_to_its_section(tmp_path):
    from pipeline.presets import apply_preset

    (tmp_path / "params.yaml").write_text("cv:\n  n_folds: 5   # folds\n\ntrain:\n  epochs: 5\n")
    (tmp_path / "p.yaml").write_text("cv:\n  seed: 7\n")
    apply_preset(str(tmp_path / "p.yaml"), tmp_path / "params.yaml")
    assert (tmp_path / "params.yaml").read_text() == "cv:\n  n_folds: 5   # folds\n  seed: 7\n\ntrain:\n  epochs: 5\n"
