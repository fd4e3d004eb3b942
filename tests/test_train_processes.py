"""The train stage as separate processes: killed with SIGKILL and resumed, and under torchrun (2 gloo ranks)."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from pipeline.config import CompetitionConfig
from pipeline.prepare import prepare
from tests.conftest import write_competition

pytestmark = pytest.mark.training  # trains or tunes: CI runs these again on another instruction set

BACKBONE = "test_resnet"


def _project(root: Path, n_per_class: int, epochs: int, batch_size: int = 4, tracking: bool = False) -> Path:
    root.mkdir(parents=True)
    comp = write_competition(root / "comp", n_per_class=n_per_class)
    prepare(
        CompetitionConfig(source=str(comp)), image_size=12, n_folds=2, seed=0, out_dir=root / "data/prepared", workers=1
    )
    (root / "params.yaml").write_text(
        yaml.safe_dump(
            {
                "competition": {"source": str(comp)},
                "train": {
                    "backbones": {BACKBONE: {}},
                    "epochs": epochs,
                    "batch_size": batch_size,
                    "lr": 0.01,
                    "augment": [{"HorizontalFlip": {"p": 0.5}}],
                },
                "tracking": {"enabled": tracking, "experiment": "procs"},
            }
        )
    )
    return root


def _env(root: Path) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "OMP_NUM_THREADS": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
    }


def _train(root: Path, launcher=()):
    cmd = [sys.executable, *launcher, "-m", "pipeline", "train", "--backbone", BACKBONE]
    return subprocess.run(cmd, cwd=root, env=_env(root), capture_output=True, text=True, timeout=300)


def _weights(root: Path) -> dict:
    return {
        k: torch.load(root / f"models/{BACKBONE}/seed42/fold{k}/model.pt", weights_only=True)["state_dict"]
        for k in range(2)
    }


def _wait_for(proc, resume: Path, *names: str) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if all(list(resume.rglob(name)) for name in names):
            return
        time.sleep(0.005)


@pytest.mark.slow  # 37 s on 2 cores: in `make test-slow`, which CI runs, to keep `make test` under 10 minutes
@pytest.mark.not_isa  # process mechanics (resume, ranks), compared on one instruction set
def test_kill_9_mid_fold_then_rerun_equals_an_uninterrupted_run_and_continues_its_mlflow_runs(tmp_path):
    whole = _project(tmp_path / "whole", n_per_class=20, epochs=8)
    killed = _project(tmp_path / "killed", n_per_class=20, epochs=8, tracking=True)
    assert _train(whole).returncode == 0

    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", "--backbone", BACKBONE],
        cwd=killed,
        env=_env(killed),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    resume = killed / "models/.resume"
    _wait_for(proc, resume, "fold0.done.pt", "fold1.state.pt")  # fold 1 past its first epoch: mid-run
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / f"models/{BACKBONE}").exists()  # nothing half-written in the output folder
    assert list((killed / "models").glob(f"{BACKBONE}.tmp*"))  # what a kill leaves: removed by the rerun
    state = torch.load(next(resume.rglob("fold1.state.pt")), weights_only=True)
    assert state["epoch"] < 7

    rerun = _train(killed)
    assert rerun.returncode == 0, rerun.stderr
    assert "fold0: finished in an earlier run, kept" in rerun.stdout
    assert "fold 1: resuming after epoch" in rerun.stdout
    a = pd.read_csv(whole / f"models/{BACKBONE}/oof_probs.csv")
    b = pd.read_csv(killed / f"models/{BACKBONE}/oof_probs.csv")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    for k, weights in _weights(whole).items():
        for name, value in weights.items():
            assert torch.equal(value, _weights(killed)[k][name]), (k, name)
    assert not any(resume.iterdir())  # the resume state is removed once the stage has finished
    assert sorted(p.name for p in (killed / "models").iterdir()) == [".resume", BACKBONE]  # no dead scratch

    client = MlflowClient(f"sqlite:///{killed}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("procs").experiment_id])
    assert sorted((r.info.run_name, r.info.status) for r in runs) == [
        ("fold0", "FINISHED"),
        ("fold1", "FINISHED"),
        (BACKBONE, "FINISHED"),
    ]  # one run each, continued
    fold1 = next(r for r in runs if r.info.run_name == "fold1")
    assert fold1.data.tags["resumed"] == "true"
    steps = [m.step for m in client.get_metric_history(fold1.info.run_id, "val_accuracy")]
    assert steps == sorted(set(steps)) and steps[-1] == 7  # one history, no epoch twice (epoch 0 logged or not)


@pytest.mark.slow  # 24 s
@pytest.mark.not_isa
def test_sigterm_stops_like_ctrl_c_keeps_the_resume_state_and_fails_the_mlflow_run(tmp_path):
    root = _project(tmp_path / "p", n_per_class=20, epochs=4, tracking=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", "--backbone", BACKBONE],
        cwd=root,
        env=_env(root),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(proc, root / "models/.resume", "fold0.state.pt")
    proc.send_signal(signal.SIGTERM)  # what timeout, SLURM and docker stop send
    returncode, stderr = proc.wait(timeout=60), proc.stderr.read()
    assert returncode == 128 + signal.SIGTERM, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last == (
        "error: train stopped by SIGTERM; the previous outputs are kept and the same command resumes "
        "from the last finished epoch"
    )
    assert sorted(p.name for p in (root / "models").iterdir()) == [".resume"]  # scratch removed, state kept
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("procs").experiment_id])
    assert {r.info.status for r in runs} == {"FAILED"}
    rerun = _train(root)
    assert rerun.returncode == 0, rerun.stderr
    assert "fold 0: resuming after epoch" in rerun.stdout
    # off a terminal: a plain line per epoch saying where the stage stands, epochs kept from the killed
    # run counted as done, and when it will end
    progress = re.findall(
        r"^train@test_resnet: (\d+)/8 epochs \((\d+)%\), \d+:\d\d elapsed, ETA (\d+):(\d\d)$", rerun.stdout, re.M
    )
    assert len(progress) >= 4 and int(progress[0][0]) >= 2 and progress[-1][:2] == ("8", "100")
    assert progress[-1][2:] == ("0", "00") and [int(p[0]) for p in progress] == sorted(int(p[0]) for p in progress)


@pytest.mark.not_isa  # process mechanics (resume, ranks), compared on one instruction set
def test_torchrun_two_gloo_ranks_train_one_model_and_only_rank0_writes(tmp_path):
    root = _project(tmp_path / "ddp", n_per_class=12, epochs=2, tracking=True)
    run = _train(root, launcher=("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "on cpu x 2 processes" in run.stdout
    assert run.stdout.count(f"{BACKBONE}: OOF ") == 1  # rank 1 printed and wrote nothing
    oof = pd.read_csv(root / f"models/{BACKBONE}/oof_probs.csv").iloc[:, 1:].to_numpy()
    np.testing.assert_allclose(oof.sum(1), 1.0, atol=1e-5)
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("procs").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["fold0", "fold1", BACKBONE]


@pytest.mark.not_isa  # process mechanics (resume, ranks), compared on one instruction set
def test_ddp_ranks_end_with_one_model_and_agree_on_validation(tmp_path):
    world = 2
    root = _project(tmp_path / "lib", n_per_class=12, epochs=1)
    script = tmp_path / "rank.py"
    script.write_text(f"""
import json, os, numpy as np, torch
from pipeline import distributed
from pipeline.config import TrainSettings
from pipeline.data import InputConfig, load_prepared
from pipeline.loop import Split, fit
from pipeline.models import create_model
device = distributed.init_from_env()
data = load_prepared({str(root / "data/prepared")!r})
f, y = data.train.fold.to_numpy(), data.train.target.to_numpy()
mean, std = data.fold_stats(0)
torch.manual_seed(0)
model = create_model("test_resnet", 3)
s = TrainSettings(epochs=1, batch_size=2, lr=0.01, augment=[], seed=0)
res = fit(model, Split(np.asarray(data.train_images[f != 0]), y[f != 0]), Split(np.asarray(data.train_images[f == 0]),
          y[f == 0]), InputConfig(12, tuple(mean), tuple(std)), s, device, task=data.task)
torch.save(model.state_dict(), {str(tmp_path)!r} + f"/rank{{distributed.rank()}}.pt")
np.save({str(tmp_path)!r} + f"/probs{{distributed.rank()}}.npy", res.val_probs)
distributed.shutdown()
""")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={world}",
            "--master_port=29534",
            str(script),
        ],
        cwd=root,
        env=_env(root),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for name, value in r0.items():
        assert torch.equal(value, r1[name]), name  # gradients were averaged: one model, two processes
    np.testing.assert_array_equal(np.load(tmp_path / "probs0.npy"), np.load(tmp_path / "probs1.npy"))
