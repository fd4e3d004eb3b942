"""The MLflow edge (pipeline/tracking.py) against a real SQLite-backed store."""

import os
import socket
import subprocess
import sys
import time

from mlflow.tracking import MlflowClient

from pipeline.tracking import HOST_TAG, PID_TAG, Tracker


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_runs_left_running_by_a_killed_process_are_failed_and_the_ui_opens_on_training_runs(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("unit")
    killed = client.create_run(exp, tags={PID_TAG: str(_dead_pid()), HOST_TAG: socket.gethostname()})
    alive = client.create_run(exp, tags={PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()})
    elsewhere = client.create_run(exp, tags={PID_TAG: str(_dead_pid()), HOST_TAG: "another-machine"})

    Tracker(True, "unit", uri=uri)
    status = {r.info.run_id: r.info.status for r in client.search_runs([exp])}
    assert status[killed.info.run_id] == "FAILED"
    assert status[alive.info.run_id] == "RUNNING"  # a live worker's run (tune workers share the store)
    assert status[elsewhere.info.run_id] == "RUNNING"  # another machine's pids say nothing here
    assert client.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_run_is_tagged_with_its_dvc_experiment_and_resumed_from_its_saved_id(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("DVC_EXP_NAME", "wide-lr")
    tracker = Tracker(True, "unit", uri=uri)
    with tracker.run("train", resume=tmp_path / "run_id"):
        tracker.log_metrics({"loss": 1.0}, step=0)
    with tracker.run("train", resume=tmp_path / "run_id"):  # started again: the same run goes on
        tracker.log_metrics({"loss": 0.5}, step=1)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("unit").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["dvc.exp_name"] == "wide-lr"
    assert [m.value for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [1.0, 0.5]


def test_a_stop_signal_waits_for_the_end_of_an_uninterrupted_block():
    import signal

    from pipeline.io import Terminated, stop_on_signals, uninterrupted

    previous = stop_on_signals()
    reached = []
    try:
        try:
            with uninterrupted():  # e.g. an SQLite write of MLflow's, or a folder swap
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):  # Python runs the handler between bytecodes: here, within the block
                    pass
                reached.append("end of block")
            reached.append("after the block")
        except Terminated:
            reached.append("stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert reached == ["end of block", "stopped"]


def test_stage_runs_log_system_metrics_and_nested_runs_do_not(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(True, "unit", uri=uri)
    with tracker.run("stage"):
        with tracker.run("fold0", nested=True):
            time.sleep(1.5)
    client = MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("unit").experiment_id])}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
        runs["stage"].data.metrics
    )
    assert not any(m.startswith("system/") for m in runs["fold0"].data.metrics)  # one monitor per stage


def test_the_default_stores_are_the_repository_dvc_started_from(tmp_path, monkeypatch):
    """`dvc exp run --queue/--temp` runs a stage in a copy under .dvc/tmp/exps with DVC_ROOT set to the
    repository it came from; the default MLflow store and its artefacts belong there, not in the copy."""
    copy = tmp_path / "repo/.dvc/tmp/exps/tmpabc"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(True, "unit")
    with tracker.run("stage"):
        (copy / "a.txt").write_text("x")
        tracker.log_artifact(str(copy / "a.txt"))
    assert (tmp_path / "repo/mlflow.db").is_file() and not (copy / "mlflow.db").exists()
    assert list((tmp_path / "repo/mlruns/unit").rglob("a.txt")) and not (copy / "mlruns").exists()
