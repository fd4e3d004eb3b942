"""MLflow at the edge: the only module that imports mlflow.

Store: `MLFLOW_TRACKING_URI` if set, else `sqlite:///mlflow.db` in the working directory
(the repo root under `dvc repro`). Browse it with

    mlflow ui --backend-store-uri sqlite:///mlflow.db
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from typing import Any, Iterator

DEFAULT_URI = "sqlite:///mlflow.db"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class Tracker:
    """Runs, params and metrics; every method is a no-op when `enabled` is False."""

    def __init__(self, enabled: bool, experiment: str, uri: str | None = None):
        self.enabled = enabled
        if not enabled:
            return
        import logging

        import mlflow

        logging.getLogger("alembic").setLevel(logging.WARNING)
        self._mlflow = mlflow
        mlflow.set_tracking_uri(uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI)
        mlflow.set_experiment(experiment)

    @contextlib.contextmanager
    def run(self, name: str, params: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
            nested: bool = False) -> Iterator[None]:
        """A run (nested under the active one if `nested`); it ends FAILED if the block raises."""
        if not self.enabled:
            yield
            return
        all_tags = {"git_commit": git_commit() or "unknown", **(tags or {})}
        if all_tags["git_commit"] != "unknown":
            all_tags["mlflow.source.git.commit"] = all_tags["git_commit"]
        with self._mlflow.start_run(run_name=name, nested=nested, tags=all_tags):
            if params:
                self.log_params(params)
            yield

    def log_params(self, params: dict[str, Any]) -> None:
        if self.enabled:  # MLflow caps a value at 6,000 characters; the full text goes in artefacts
            self._mlflow.log_params({k: str("null" if v is None else v)[:6000] for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.enabled:
            self._mlflow.log_metrics(metrics, step=step)

    def log_artifact(self, path: str) -> None:
        if self.enabled:
            self._mlflow.log_artifact(path)

    def log_artifacts(self, folder: str, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._mlflow.log_artifacts(folder, artifact_path)
