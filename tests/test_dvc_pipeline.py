"""The real DVC pipeline end to end, in a temporary git repo, on a tiny competition and tiny timm models."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.data import default_augment
from tests.conftest import write_competition

pytestmark = pytest.mark.training  # trains or tunes: CI runs these again on another instruction set

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd, env, check=True):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _set_params(repo, **sections):
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def _status(repo, env) -> dict:
    return json.loads(_run(["dvc", "status", "--json"], repo, env).stdout or "{}")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    shutil.copy(ROOT / "dvc.yaml", repo)
    shutil.copy(ROOT / "params.yaml", repo)
    shutil.copy(ROOT / ".gitignore", repo)
    shutil.copytree(ROOT / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    write_competition(repo / "data" / "raw" / "comp", n_per_class=8, n_test=6)
    shutil.copy(ROOT / "data" / "raw" / ".gitignore", repo / "data" / "raw")
    _set_params(
        repo,
        competition={"source": "data/raw/comp"},
        prepare={"image_size": 12, "workers": 1},
        cv={"n_folds": 2},
        train={"backbones": {"test_resnet": {}, "test_efficientnet": {"lr": 0.01}}, "epochs": 2, "batch_size": 4},
        tta={"select": "auto", "candidates": ["none", "hflip"]},
        ensemble={"methods": ["soft_voting", "caruana", "optimized"]},
    )
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{repo}/mlflow.db",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    _run(["git", "init", "-q"], repo, env)
    _run(["dvc", "init", "-q"], repo, env)
    shutil.copy(ROOT / ".dvcignore", repo)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "init"], repo, env)
    first = _run(["dvc", "repro"], repo, env)
    return repo, env, first


def test_repro_writes_a_valid_submission_and_metrics(repo):
    repo, env, _ = repo
    sample = pd.read_csv(repo / "data/raw/comp/sample_submission.csv", dtype=str)
    submission = pd.read_csv(repo / "submissions/submission.csv", dtype=str)
    assert list(submission.columns) == list(sample.columns)
    assert submission["id"].tolist() == sample["id"].tolist()
    assert set(submission["label"]) <= {"cat", "dog", "frog"}

    metrics = json.loads(_run(["dvc", "metrics", "show", "--json"], repo, env).stdout)
    files = next(iter(metrics.values()))["data"]
    assert set(files) == {"reports/metrics.json"}  # the headline only; each stage's report on request
    shown = _run(["dvc", "metrics", "show"], repo, env).stdout.splitlines()
    assert max(map(len, shown)) <= 120, shown
    for backbone in ("test_resnet", "test_efficientnet"):
        train = json.loads((repo / f"reports/train/{backbone}.json").read_text())
        assert set(train["folds"]) == {"0", "1"} and 0 <= train["oof"]["accuracy"] <= 1
    ensemble = json.loads(_run(["dvc", "metrics", "show", "--json", "reports/ensemble.json"], repo, env).stdout)
    ensemble = next(iter(ensemble.values()))["data"]["reports/ensemble.json"]["data"]
    head = files["reports/metrics.json"]["data"]
    assert head == {
        "method": ensemble["method"],
        "accuracy": pytest.approx(ensemble["oof"]["accuracy"], abs=1e-5),
        "log_loss": pytest.approx(ensemble["oof"]["log_loss"], abs=1e-5),
        "lb_accuracy": pytest.approx(ensemble["local_leaderboard"]["accuracy"], abs=1e-5),
    }
    assert set(ensemble) >= {"oof", "local_leaderboard", "methods", "best_single", "gain_over_best_single"}
    for name in ("soft_voting", "caruana", "optimized"):  # one honest score and one submission per method
        method = ensemble["methods"][name]
        assert 0 <= method["oof"]["accuracy"] <= 1 and (repo / method["submission"]).is_file()
    assert ensemble["oof"] == ensemble["methods"][ensemble["method"]]["oof"]
    for backbone in ("test_resnet", "test_efficientnet"):  # each backbone with and without TTA
        single = ensemble["backbones"][backbone]
        assert single["tta"] in ("none", "hflip") and set(single["oof_no_tta"]) >= {"accuracy", "log_loss"}
    answers = pd.read_csv(repo / "data/raw/comp/solution.csv", dtype=str)
    expected_lb = (submission["label"] == answers.set_index("id").loc[submission["id"], "label"].values).mean()
    assert ensemble["local_leaderboard"]["accuracy"] == pytest.approx(expected_lb)
    # the analyze stage read the ensemble's OOF file: its scores agree with the ensemble stage's
    analysis = json.loads((repo / "reports/oof/summary.json").read_text())
    assert analysis["ensemble"]["accuracy"] == pytest.approx(ensemble["oof"]["accuracy"])
    backbone = analysis["backbones"]["test_resnet"]
    assert backbone["log_loss"] == pytest.approx(ensemble["backbones"]["test_resnet"]["oof"]["log_loss"])
    page = (repo / "reports/oof/index.html").read_text()
    sections = ("backbone-test_resnet", "backbone-test_efficientnet", "ensemble")
    assert all(f'id="{m}-slices"' in page for m in sections)
    # no budget: the params' epochs, and every stage's own seconds in reports/timing.json, from one run
    timing = json.loads((repo / "reports/timing.json").read_text())
    assert timing["budget_minutes"] is None and timing["one_run"]
    stages = [
        "prepare",
        "plan",
        *(f"{s}@{b}" for s in ("train", "predict") for b in ("test_resnet", "test_efficientnet")),
        "ensemble",
        "analyze",
    ]
    assert all(timing["stages"][s]["actual_s"] > 0 for s in stages) and timing["stages"]["dvc"]["actual_s"] > 0


@pytest.mark.not_isa
def test_a_queued_experiment_logs_into_the_workspaces_mlflow_store(repo):
    """Second in the module: the workspace is as the first `dvc repro` left it, so the queued copy reruns
    only what the experiment changes (the ensemble and what reads it)."""
    repo, env, _ = repo
    env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}  # the default store: the repository's
    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    experiment = client.get_experiment_by_name("comp").experiment_id
    before = {r.info.run_id for r in client.search_runs([experiment], max_results=1000)}
    _run(["dvc", "add", "data/raw/comp"], repo, env)  # a queued copy has only what git and DVC track
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "the raw competition under DVC, and the lock"], repo, env)
    _run(["dvc", "exp", "run", "--queue", "-n", "queued", "-S", "ensemble.method=soft_voting"], repo, env)
    _run(["dvc", "exp", "run", "--run-all"], repo, env)  # the queue's worker, in a copy under .dvc/tmp/exps
    new = [r for r in client.search_runs([experiment], max_results=1000) if r.info.run_id not in before]
    ensemble = [r for r in new if r.info.run_name == "ensemble"]
    assert len(ensemble) == 1 and ensemble[0].data.params["method"] == "soft_voting"
    assert ensemble[0].data.tags["dvc.exp_name"] == "queued"
    assert not list((repo / ".dvc").rglob("mlflow.db")) and not list((repo / ".dvc").rglob("mlruns"))


def test_mlflow_has_one_run_per_backbone_with_fold_children(repo):
    repo, env, _ = repo
    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    exp = client.get_experiment_by_name("comp")  # named after the competition folder
    runs = client.search_runs([exp.experiment_id], "tags.`dvc.exp_name` IS NULL")  # the first repro's, not the queue's
    by_name = {r.info.run_name: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert set(by_name) == {
        "test_resnet",
        "test_efficientnet",
        "predict test_resnet",
        "predict test_efficientnet",
        "ensemble",
        "analyze",
        "timing",
    }
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on these runs
    first = _run(["git", "rev-list", "--max-parents=0", "HEAD"], repo, env).stdout.strip()  # the repro's commit
    assert {r.data.tags.get("mlflow.source.git.commit") for r in by_name.values()} == {first}  # MLflow's own tag
    report = {a.path for a in client.list_artifacts(by_name["analyze"].info.run_id, "oof")}
    assert "oof/index.html" in report

    def children(name):
        return {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == by_name[name].info.run_id}

    methods = children("ensemble")  # one run per method, the same metric names: comparable as runs
    assert set(methods) == {"soft_voting", "caruana", "optimized"}
    assert all(
        {"oof_accuracy", "oof_log_loss", "local_leaderboard_accuracy"} <= set(r.data.metrics) for r in methods.values()
    )
    assert [n for n, r in methods.items() if r.data.tags["chosen"] == "true"] == [
        by_name["ensemble"].data.params["method"]
    ]
    for backbone in ("test_resnet", "test_efficientnet"):
        parent = by_name[backbone]
        assert len(children(backbone)) == 2
        assert parent.data.params["epochs"] == "2" and "cv_accuracy" in parent.data.metrics
        artefacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
        assert {"oof_probs.csv", "augment.json", "params.yaml"} <= artefacts and "models" not in artefacts
        assert parent.data.tags["models"] == f"models/{backbone} (DVC output of train@{backbone})"  # stored once
        policies = children(f"predict {backbone}")  # every TTA candidate, scored on OOF
        assert set(policies) == {"none", "hflip"} and all("oof_log_loss" in r.data.metrics for r in policies.values())
        # `augment: null` is recorded as what ran: the shift at the 12 px cache's size
        assert json.loads(parent.data.params["augment"]) == default_augment(12)


def test_dvc_plots_show_writes_a_page_that_needs_no_network(repo):
    repo, env, _ = repo
    _run(["dvc", "plots", "show"], repo, env)
    page = (repo / "dvc_plots/index.html").read_text()
    assert "<img" in page and "confusion.png" in page and "reliability.png" in page
    assert "<script src=" not in page and "http" not in page.replace("http-equiv", "")
    shutil.rmtree(repo / "dvc_plots")


def test_second_repro_has_nothing_to_do(repo):
    repo, env, _ = repo
    assert _status(repo, env) == {}
    again = _run(["dvc", "repro"], repo, env)
    assert "Running stage" not in again.stdout


def _readme_repro(repo: Path, env: dict) -> str:
    """The README's `dvc repro` block, verbatim, in a bash whose PATH lacks the virtualenv and whose
    first `python` is a decoy: the stages run only if the block puts the project's python first.
    Returns its output."""
    from tests.test_readme import ACTIVATE, command_blocks

    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").is_file():
        pytest.skip(f"the tests run outside a virtualenv ({venv}): nothing to activate")
    block = next(b for b in command_blocks((ROOT / "README.md").read_text()) if b == [ACTIVATE, "dvc repro"])
    decoy = repo.parent / "decoy-bin"
    decoy.mkdir(exist_ok=True)
    (decoy / "python").write_text("#!/bin/sh\necho 'not the project python' >&2\nexit 3\n")
    (decoy / "python").chmod(0o755)
    (repo / ".venv").symlink_to(venv)
    try:
        proc = subprocess.run(
            ["bash", "-c", "\n".join(block)],
            cwd=repo,
            env={**env, "PATH": f"{decoy}:/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        (repo / ".venv").unlink()
    assert proc.returncode == 0 and "not the project python" not in proc.stderr, (
        proc.stdout[-2000:] + proc.stderr[-2000:]
    )
    return proc.stdout


@pytest.mark.not_isa  # what DVC reruns, not float results
def test_changing_ensemble_weights_reruns_only_the_ensemble_its_analysis_and_timing_through_the_readme_block(repo):
    repo, env, _ = repo
    # soft voting submitted: new weights change the ensemble's OOF file, which analyze reads. (Under
    # `method: auto` the choice between methods is the training run's, which differs between CPUs; had
    # it chosen another method, the file would not change and DVC would rightly skip analyze.)
    _set_params(repo, ensemble={"method": "soft_voting", "weights": {"test_resnet": 3}})
    assert set(_status(repo, env)) == {"ensemble"}
    out = _readme_repro(repo, env)  # run as the README shows it, from a shell without the venv
    assert set(re.findall(r"Running stage '([^']+)'", out)) == {"ensemble", "analyze", "timing"}
    report = json.loads((repo / "reports/ensemble.json").read_text())
    assert report["method"] == "soft_voting"
    assert report["methods"]["soft_voting"]["weights"] == {"test_resnet": 0.75, "test_efficientnet": 0.25}


@pytest.mark.not_isa  # what DVC reruns, not float results
def test_editing_a_tta_view_reruns_predict_and_what_reads_it_never_training(repo):
    repo, env, _ = repo
    views = repo / "pipeline" / "tta.py"
    source = views.read_text()
    assert 'register_view("brighter")(_brightness(1.1))' in source
    views.write_text(
        source.replace('register_view("brighter")(_brightness(1.1))', 'register_view("brighter")(_brightness(1.15))')
    )
    # the plan counts views from params alone: editing how a view is computed re-plans nothing, retrains nothing
    # (a refit predicts with the views too: its stages rerun, refit off in a moment)
    predicting = {f"{s}@{b}" for s in ("predict", "refit") for b in ("test_resnet", "test_efficientnet")}
    assert set(_status(repo, env)) == predicting
    out = _run(["dvc", "repro"], repo, env).stdout
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert predicting <= ran <= predicting | {"ensemble", "analyze", "timing"}
    assert _status(repo, env) == {}


def test_changing_one_backbone_reruns_only_that_backbone(repo):
    repo, env, _ = repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["backbones"]["test_efficientnet"]["lr"] = 0.02
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = set(_status(repo, env))
    assert "train@test_efficientnet" in changed
    assert not {"prepare", "train@test_resnet", "predict@test_resnet"} & changed


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.not_isa
def test_a_stage_failing_under_dvc_repro_keeps_its_previous_outputs(repo):
    repo, env, _ = repo
    before = {
        "models": _tree(repo / "models/test_resnet"),
        "report": (repo / "reports/train/test_resnet.json").read_bytes(),
        "status": _status(repo, env),
    }
    params = (repo / "params.yaml").read_text()
    backbones = yaml.safe_load(params)["train"]["backbones"]
    _set_params(repo, train={"backbones": {**backbones, "test_resnet": {"lr": -0.01}}})
    try:
        proc = _run(["dvc", "repro", "--single-item", "--force", "train@test_resnet"], repo, env, check=False)
    finally:
        (repo / "params.yaml").write_text(params)
    assert proc.returncode != 0
    assert "error: params.yaml: train.backbones.test_resnet.lr must be >= 0, got -0.01" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout
    assert _tree(repo / "models/test_resnet") == before["models"]  # DVC removed neither (persist: true)
    assert (repo / "reports/train/test_resnet.json").read_bytes() == before["report"]
    assert _status(repo, env) == before["status"]


@pytest.mark.not_isa
def test_a_killed_stages_scratch_folder_is_not_hashed_by_dvc_and_the_next_run_removes_it(repo):
    repo, env, _ = repo
    before = _status(repo, env)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    scratch = repo / f"predictions/test_resnet.tmp{dead.pid}"  # what `kill -9` during predict leaves
    scratch.mkdir()
    (scratch / "oof_probs.csv").write_text("")
    assert _status(repo, env) == before  # the ensemble's `predictions` dependency did not change
    _run(["python", "-m", "pipeline", "predict", "--backbone", "test_resnet"], repo, env)
    assert not scratch.exists()


@pytest.mark.not_isa
def test_a_truncated_fold_checkpoint_stops_predict_with_one_line_and_keeps_the_predictions(repo):
    repo, env, _ = repo
    model = repo / "models/test_resnet/seed42/fold0/model.pt"
    before = _tree(repo / "predictions/test_resnet")
    data = model.read_bytes()
    try:
        model.write_bytes(data[: len(data) // 2])  # an interrupted copy
        proc = _run(["python", "-m", "pipeline", "predict", "--backbone", "test_resnet"], repo, env, check=False)
    finally:
        model.write_bytes(data)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: models/test_resnet/seed42/fold0/model.pt: cannot be read, truncated or corrupt (")
    )
    assert _tree(repo / "predictions/test_resnet") == before


@pytest.mark.not_isa
def test_unknown_backbone_fails_with_a_one_line_error(repo):
    repo, env, _ = repo
    before = (repo / "submissions/submission.csv").read_bytes()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["backbones"] = {"resnet_nope": {}}
    params["ensemble"]["weights"] = {}  # an earlier test weighted test_resnet, no longer a backbone here
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = _run(["python", "-m", "pipeline", "train", "--backbone", "resnet_nope"], repo, env, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: params.yaml: train.backbones.resnet_nope: unknown timm model 'resnet_nope' (see timm.list_models())"
    )
    assert not list((repo / "models").glob("resnet_nope*"))
    assert (repo / "submissions/submission.csv").read_bytes() == before
