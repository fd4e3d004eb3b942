"""The offline inference bundle: it reproduces the ensemble stage's submission for every method, predicts a
hidden test set that replaces the public one, runs where mlflow, optuna and dvc cannot be imported, holds
no pickle, and names what is wrong with a damaged bundle."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import __main__ as cli
from pipeline.bundle import predict_bundle, verify_bundle, write_bundle
from pipeline.config import load_params
from pipeline.ensemblers import ENSEMBLES
from pipeline.paths import RunPaths
from tests.conftest import make_image, write_competition

pytestmark = [pytest.mark.training, pytest.mark.not_isa]  # trains tiny models; its subject is the bundle

CLASSES = ["cat", "dog", "frog"]
PARAMS = """
competition: {{source: {source}}}
prepare: {{image_size: 12, workers: 1}}
cv: {{n_folds: 2}}
train:
  backbones:
    test_resnet: {{}}
    test_efficientnet: {{lr: 0.01}}
    features: {{model: test_resnet, finetune: features+sklearn, feature_layer: layer2}}
  epochs: 1
  batch_size: 4
tta: {{select: hflip}}
ensemble: {{methods: [{methods}]}}
tracking: {{enabled: false}}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run in probability format (so every method's file carries probabilities): two
    fine-tuned backbones and a features+sklearn one, the hflip TTA, every ensemble method."""
    root = tmp_path_factory.mktemp("run")
    comp = write_competition(root / "data/raw/comp", n_per_class=8, n_test=12)
    sample = pd.read_csv(comp / "sample_submission.csv", dtype=str)
    sample[["id"]].assign(**{c: "0.333" for c in CLASSES}).to_csv(comp / "sample_submission.csv", index=False)
    methods = ", ".join(ENSEMBLES)
    (root / "params.yaml").write_text(PARAMS.format(source="data/raw/comp", methods=methods))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        stages = [["prepare"], ["plan"]]
        for backbone in ("test_resnet", "test_efficientnet", "features"):
            stages += [["train", "--backbone", backbone], ["predict", "--backbone", backbone]]
        for stage in [*stages, ["ensemble"]]:
            assert cli.main(stage) == 0, stage
    finally:
        os.chdir(cwd)
    return root


def _bundle(run: Path, method: str, out: Path) -> dict:
    """The library call, made from another directory: every path comes from `RunPaths(run)`."""
    out.mkdir()
    cwd = os.getcwd()
    os.chdir(out.parent)
    try:
        return write_bundle(load_params(run / "params.yaml"), RunPaths(run), out, method)
    finally:
        os.chdir(cwd)


def _read(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"id": str})


@pytest.mark.parametrize("method", list(ENSEMBLES))
def test_the_bundle_reproduces_each_methods_submission(run, tmp_path, method):
    spec = _bundle(run, method, tmp_path / "bundle")
    got = predict_bundle(
        tmp_path / "bundle", run / "data/raw/comp/test", run / "data/raw/comp/sample_submission.csv", tmp_path / "s.csv"
    )
    report = json.loads((run / "reports/ensemble.json").read_text())
    expected = _read(run / report["methods"][method]["submission"])
    assert (
        got["id"].tolist()
        == expected["id"].tolist()
        == _read(run / "data/raw/comp/sample_submission.csv")["id"].tolist()
    )
    gap = np.abs(got[CLASSES].to_numpy(float) - expected[CLASSES].to_numpy(float)).max()
    assert gap <= 1e-5
    assert (got[CLASSES].to_numpy().argmax(1) == expected[CLASSES].to_numpy().argmax(1)).all()
    assert _read(tmp_path / "s.csv").equals(got.astype({"id": str}))
    members = {m["backbone"]: m for m in spec["members"]}
    assert {m["tta"]["policy"] for m in members.values()} == {"hflip"}
    for entry in members.get("features", {"models": []})["models"]:  # its head, read from an earlier stage
        assert entry["head"] and entry["checkpoint"]["feature_layer"] == "layer2"
    if method in ("hard_voting", "rank_average", "stacking"):  # these read every member, the sklearn one too
        assert set(members) == {"test_resnet", "test_efficientnet", "features"}
    fitted = json.loads((run / "submissions/ensemble.json").read_text())
    attrs = fitted["states"][method]["attrs"]
    if "weights_" in attrs:  # all but stacking: the members of non-zero weight (unrounded, as fitted)
        weights = dict(zip(fitted["members"], attrs["weights_"]["array"]["values"]))
        assert set(members) == {b for b, w in weights.items() if w > 0}


def test_the_submission_method_is_what_the_bundle_carries_by_default(run, tmp_path, monkeypatch):
    spec = _bundle(run, None, tmp_path / "bundle")
    monkeypatch.chdir(tmp_path)  # not the run's folder: the check reads the run through RunPaths alone
    params = load_params(run / "params.yaml")
    checked = verify_bundle(tmp_path / "bundle", params.competition, spec["ensemble"]["method"], RunPaths(run))
    assert checked["rows"] == 12 and checked["max_abs_diff"] <= 1e-5
    assert spec["ensemble"]["method"] == json.loads((run / "reports/ensemble.json").read_text())["method"]
    names = {p.name for p in (tmp_path / "bundle").iterdir()}
    assert {"bundle.json", "predict.py", "dataset-metadata.json"} <= names
    assert all(p.suffix in (".json", ".py", ".whl", ".safetensors") for p in (tmp_path / "bundle").iterdir()), names
    assert all(p.is_file() for p in (tmp_path / "bundle").iterdir())  # flat: Kaggle's upload skips folders
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "bundle").iterdir()}
    assert len(set(modes.values())) == 1, modes  # safetensors' 0600 given the mode of the rest


BLOCK = """
import atexit, sys
STAGES = ("prepare", "plan", "tune", "train", "predict", "ensemble", "analyze", "timing")
STAGE_MODULES = {"pipeline." + s for s in STAGES}
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mlflow", "optuna", "dvc") or name in STAGE_MODULES:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Blocked())
atexit.register(lambda: print("PIPELINE_FROM", sys.modules["pipeline"].__file__))
sys.argv = sys.argv[1:]
exec(compile(open(sys.argv[0]).read(), sys.argv[0], "exec"), {"__name__": "__main__", "__file__": sys.argv[0]})
"""


def test_a_hidden_test_set_with_other_ids_is_predicted_offline_from_the_bundle_alone(run, tmp_path):
    bundle = tmp_path / "bundle"
    _bundle(run, "soft_voting", bundle)  # one probability per image: the same image scores the same anywhere
    public = run / "data/raw/comp/test"
    hidden = tmp_path / "hidden" / "test"
    hidden.mkdir(parents=True)
    rng = np.random.default_rng(7)
    copies = {f"h{i:02d}": f"te{i * 2:03d}" for i in range(5)}  # five public images under new ids...
    for new, old in copies.items():
        shutil.copy(public / f"{old}.jpg", hidden / f"{new}.jpg")
    for i in range(4):  # ...and four new ones: 9 rows, not 12
        make_image(i % 3, rng).save(hidden / f"new{i}.jpg")
    ids = [*copies, *(f"new{i}" for i in range(4))][::-1]
    pd.DataFrame({"id": ids, **{c: 0.333 for c in CLASSES}}).to_csv(tmp_path / "hidden/sample.csv", index=False)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK, str(bundle / "predict.py"), "--test-dir", str(hidden)]
        + ["--sample", str(tmp_path / "hidden/sample.csv"), "--out", str(tmp_path / "hidden/submission.csv")],
        cwd=tmp_path,
        env={**env, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ".whl" in proc.stdout.split("PIPELINE_FROM", 1)[1]  # the bundle's own code, not the repository's
    assert "model 6/6" in proc.stderr and "left" in proc.stderr  # progress with the time left
    got = _read(tmp_path / "hidden/submission.csv")
    assert got["id"].tolist() == ids
    public_probs = _read(run / "submissions/methods" / _method_file(run, "soft_voting")).set_index("id")
    for new, old in copies.items():
        row = got.set_index("id").loc[new, CLASSES].to_numpy(float)
        assert np.abs(row - public_probs.loc[old, CLASSES].to_numpy(float)).max() <= 1e-5


def _method_file(run: Path, method: str) -> str:
    return Path(json.loads((run / "reports/ensemble.json").read_text())["methods"][method]["submission"]).name


def test_without_a_sample_every_image_in_the_folder_is_a_test_image(run, tmp_path):
    _bundle(run, "caruana", tmp_path / "bundle")
    folder = tmp_path / "imgs" / "nested"
    folder.mkdir(parents=True)
    for name in ("b.png", "a.jpg"):
        make_image(0, np.random.default_rng(0)).save(folder / name)
    got = predict_bundle(tmp_path / "bundle", tmp_path / "imgs", None, tmp_path / "s.csv")
    assert got["id"].tolist() == ["nested/a.jpg", "nested/b.png"] and list(got.columns) == ["id", *CLASSES]


def _damage(bundle: Path, how: str) -> str:
    """Damage the bundle one way; returns what the error must name."""
    spec_path = bundle / "bundle.json"
    spec = json.loads(spec_path.read_text())
    weights = spec["members"][0]["models"][0]["weights"]
    if how == "truncated json":
        spec_path.write_text(spec_path.read_text()[:200])
        return "bundle.json: not valid JSON (line"
    if how == "missing weights":
        (bundle / weights).unlink()
        return f"{weights}: missing from the bundle"
    if how == "changed weights":
        data = bytearray((bundle / weights).read_bytes())
        data[-1] ^= 1
        (bundle / weights).write_bytes(bytes(data))
        return f"{weights}: changed since the bundle was written"
    if how == "missing key":
        del spec["ensemble"]
        spec_path.write_text(json.dumps(spec))
        return "bundle.json: key 'ensemble' missing"
    spec["ensemble"]["state"]["estimator"] = "Popen"  # anything but the pipeline's and sklearn's classes
    spec_path.write_text(json.dumps(spec))
    return "unknown estimator type 'Popen'"


@pytest.mark.parametrize("how", ["truncated json", "missing weights", "changed weights", "missing key", "bad type"])
def test_a_damaged_bundle_is_one_line_naming_it_and_writes_nothing(run, tmp_path, capsys, how):
    from pipeline.bundle import main

    bundle = tmp_path / "bundle"
    _bundle(run, "caruana", bundle)
    expected = _damage(bundle, how)
    out = tmp_path / "submission.csv"
    out.write_text("previous\n")
    args = ["--bundle", str(bundle), "--test-dir", str(run / "data/raw/comp/test"), "--out", str(out)]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and expected in err, err  # before any work
    assert out.read_text() == "previous\n"


def test_the_bundle_command_checks_itself_and_keeps_the_previous_bundle_when_it_disagrees(run, monkeypatch, capsys):
    monkeypatch.chdir(run)
    assert cli.main(["bundle"]) == 0  # the real check: predict.py in a process without mlflow, optuna, dvc
    report = json.loads((run / "reports/bundle.json").read_text())
    assert report["rows"] == 12 and report["max_abs_diff"] <= 1e-5 and report["size_mb"] > 0
    before = {p.name: p.read_bytes() for p in (run / "bundle").iterdir()}
    submission = (
        run / json.loads((run / "reports/ensemble.json").read_text())["methods"][report["method"]]["submission"]
    )
    saved, saved_probs = submission.read_text(), (run / "submissions/test_probs.csv").read_text()
    frame = _read(submission)
    frame.loc[3, CLASSES] = frame.loc[3, CLASSES[::-1]].to_numpy()  # one row that no longer matches
    frame.to_csv(submission, index=False)
    try:
        capsys.readouterr()
        assert cli.main(["bundle"]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "does not reproduce" in err and "row 5" in err, err
        assert {p.name: p.read_bytes() for p in (run / "bundle").iterdir()} == before
        submission.write_text(saved)
        probs = _read(run / "submissions/test_probs.csv")  # the submission's probabilities are checked too
        probs.loc[0, "cat"] += 1e-4
        probs.to_csv(run / "submissions/test_probs.csv", index=False)
        assert cli.main(["bundle"]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "does not reproduce submissions/test_probs.csv: row 2" in err, err
    finally:
        submission.write_text(saved)
        (run / "submissions/test_probs.csv").write_text(saved_probs)


def test_bundling_a_run_that_has_not_finished_names_what_is_missing(run, tmp_path, monkeypatch, capsys):
    shutil.copytree(run / "data", tmp_path / "data")
    shutil.copy(run / "params.yaml", tmp_path)
    monkeypatch.chdir(tmp_path)  # prepared data, but no predictions or ensemble yet
    assert cli.main(["bundle"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: submissions/ensemble.json: not found (run `dvc repro` first: the bundle packs a finished run)"
    assert not (tmp_path / "bundle").exists()
