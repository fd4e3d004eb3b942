"""The MLflow edge (pipeline/tracking.py) against a real SQLite-backed store."""

import os
import socket
import subprocess
import sys

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
