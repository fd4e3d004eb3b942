"""MLflow at the edge: the only module that imports mlflow.

Store: `MLFLOW_TRACKING_URI` if set, else `mlflow.db` (artefacts in `mlruns/`) at the repository's
root, also for `dvc exp run --queue` / `--temp` (io.repository_root). Browse it with

    mlflow ui --backend-store-uri sqlite:///mlflow.db
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Any, Iterator

from pipeline.io import pid_alive, repository_root, uninterrupted

EXPERIMENT_KIND = "custom_model_development"  # mlflow.experimentKind: MLflow 3 UIs that read it open on the runs
PID_TAG, HOST_TAG = "pipeline.pid", "pipeline.host"  # who runs it: a RUNNING run whose process is gone was killed
DVC_TAGS = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.baseline_rev"}  # set by `dvc exp run`


def _saved_run(client, path: str | Path | None) -> str | None:
    """The run id saved in `path`, if that run still exists in the store."""
    if path is None or not Path(path).is_file():
        return None
    run_id = Path(path).read_text().strip()
    try:
        client.get_run(run_id)
    except Exception:  # deleted, or another store: start a new run
        return None
    return run_id


def experiment_name(params) -> str:
    """MLflow experiment: tracking.experiment, else the competition's name (its file or folder stem)."""
    if params.tracking.experiment:
        return params.tracking.experiment
    name = Path(params.competition.source.rstrip("/")).name
    return name[:-4] if name.endswith(".zip") else name


class Tracker:
    """Runs, params and metrics; every method is a no-op when `enabled` is False."""

    def __init__(self, enabled: bool, experiment: str, uri: str | None = None):
        self.enabled = enabled
        if not enabled:
            return
        import logging

        import mlflow

        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        self._mlflow = mlflow
        root = repository_root()
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri or f"sqlite:///{root / 'mlflow.db'}")
        with uninterrupted():
            if uri is None and mlflow.get_experiment_by_name(experiment) is None:  # artefacts beside the store
                with contextlib.suppress(mlflow.exceptions.MlflowException):  # another worker created it first
                    mlflow.create_experiment(experiment, artifact_location=(root / "mlruns" / experiment).as_uri())
            exp = mlflow.set_experiment(experiment)
            if exp.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND:
                mlflow.set_experiment_tag("mlflow.experimentKind", EXPERIMENT_KIND)
            self._fail_dead_runs(exp.experiment_id)

    def _fail_dead_runs(self, experiment_id: str) -> None:
        """Mark FAILED the runs still RUNNING whose process, on this machine, is gone (killed by
        SIGKILL, OOM or a lost session: nothing ran their `finally`)."""
        client = self._mlflow.MlflowClient()
        for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
            tags = run.data.tags
            if (
                tags.get(HOST_TAG) == socket.gethostname()
                and tags.get(PID_TAG, "").isdigit()
                and not pid_alive(int(tags[PID_TAG]))
            ):
                client.set_terminated(run.info.run_id, "FAILED")

    @contextlib.contextmanager
    def run(
        self,
        name: str,
        params: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
        nested: bool = False,
        resume: str | Path | None = None,
    ) -> Iterator[None]:
        """A run (nested under the active one if `nested`); it ends FAILED if the block raises (Ctrl-C
        and SIGTERM included). With `resume`, a file: the run whose id it holds is continued (a stage
        killed and started again keeps one run), else a new run's id is written there."""
        if not self.enabled:
            yield
            return
        all_tags = {  # MLflow adds its own: mlflow.source.git.commit, .name, .type, mlflow.user
            PID_TAG: str(os.getpid()),
            HOST_TAG: socket.gethostname(),
            **{tag: os.environ[var] for var, tag in DVC_TAGS.items() if os.environ.get(var)},
            **(tags or {}),
        }
        with uninterrupted():  # a stop signal inside an SQLite write would leave the store locked
            run_id = _saved_run(self._mlflow.MlflowClient(), resume)
            run = self._mlflow.start_run(
                run_id=run_id,
                run_name=None if run_id else name,
                nested=nested,
                tags=None if run_id else all_tags,
                log_system_metrics=not nested,  # CPU, memory, disk (GPU where there is one) under system/
            )
            if run_id:
                self._mlflow.set_tags({PID_TAG: all_tags[PID_TAG], HOST_TAG: all_tags[HOST_TAG], "resumed": "true"})
            elif resume is not None:
                Path(resume).parent.mkdir(parents=True, exist_ok=True)
                Path(resume).write_text(run.info.run_id)
        if params and not run_id:
            self.log_params(params)
        status = "FAILED"
        try:
            yield
            status = "FINISHED"
        finally:
            with uninterrupted():
                self._mlflow.end_run(status)

    def log_candidates(
        self,
        candidates: dict[str, tuple[dict, dict]],
        chosen: str,
        tags: dict[str, str],
        artifacts: dict[str, str] | None = None,
    ) -> None:
        """One nested run per candidate the stage chose among (a TTA policy, an ensemble method): its
        (params, metrics) under the same metric names for every candidate and a `chosen` tag, so the
        UI compares them as runs; `artifacts` maps a candidate to a file to attach."""
        for name, (params, metrics) in candidates.items():
            with self.run(name, params=params, tags={**tags, "chosen": str(name == chosen).lower()}, nested=True):
                self.log_metrics(metrics)
                if artifacts and name in artifacts:
                    self.log_artifact(artifacts[name])

    def log_params(self, params: dict[str, Any]) -> None:
        if self.enabled:  # MLflow caps a value at 6,000 characters; the full text goes in artefacts
            with uninterrupted():
                self._mlflow.log_params({k: str("null" if v is None else v)[:6000] for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.enabled:
            with uninterrupted():
                self._mlflow.log_metrics(metrics, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            with uninterrupted():
                self._mlflow.set_tags(tags)

    def log_artifact(self, path: str) -> None:
        if self.enabled:
            with uninterrupted():
                self._mlflow.log_artifact(path)

    def log_artifacts(self, folder: str, artifact_path: str | None = None) -> None:
        if self.enabled:
            with uninterrupted():
                self._mlflow.log_artifacts(folder, artifact_path)
