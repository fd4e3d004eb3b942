"""`tune` stage: an Optuna study per backbone whose objective is the cross-validated score.

    python -m pipeline tune --backbone resnet10t    # writes tuning/resnet10t/, reports/tune/resnet10t.json

A trial trains `tune.folds`, each set up by `train.train_fold` as the train stage sets it up, for
`tune.epochs` epochs, and reports
after every epoch at step `i * epochs + epoch` (i = position of the fold), so a pruner compares
fold i at epoch e only with other trials' fold i at epoch e, never one fold with another.
The study lives in an RDB storage: rerunning continues it up to `tune.n_trials` finished trials,
several processes can share it, and a killed worker's trial is failed by the heartbeat and
retried with the same parameters. More workers on one study, on one or several machines:

    OPTUNA_STORAGE=postgresql://user:pass@host/db python -m pipeline tune --backbone resnet10t   # x N
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import optuna
import torch
import yaml

from pipeline.backbone import Backbone
from pipeline.config import Params, TrainSettings, TuneConfig, check_train_settings
from pipeline.data import PreparedData
from pipeline.errors import PipelineError
from pipeline.fold import train_fold
from pipeline.io import StageProgress, atomic_dir, repository_root
from pipeline.metrics import direction as metric_direction
from pipeline.tracking import Tracker, experiment_name

# what a trial's parameters can provoke (a NaN loss, a shape or value a transform rejects): the trial
# fails with its reason and the study goes on
FAILURES = (PipelineError, RuntimeError, ValueError)


# ---------------------------------------------------------------- search space


def search_space(tune: TuneConfig, backbone: str) -> dict[str, dict]:
    """`tune.space` with `tune.backbones.<backbone>` entries added or replacing (checked when params are read)."""
    return {**tune.space, **tune.backbones.get(backbone, {})}


def sample(trial: optuna.Trial, space: dict[str, dict], base: TrainSettings) -> dict:
    """Draw one value per parameter; an entry with `when: {p: v}` is drawn only where p is v."""
    values: dict = {}
    for name, spec in space.items():
        condition = spec.get("when") or {}
        if any(values.get(p, getattr(base, p, None)) != v for p, v in condition.items()):
            continue
        kind = spec["type"]
        if kind == "categorical":
            values[name] = trial.suggest_categorical(name, spec["choices"])
        elif kind == "int":
            values[name] = trial.suggest_int(
                name,
                int(spec["low"]),
                int(spec["high"]),
                step=int(spec.get("step", 1)),
                log=bool(spec.get("log", False)),
            )
        else:
            values[name] = trial.suggest_float(
                name, float(spec["low"]), float(spec["high"]), step=spec.get("step"), log=bool(spec.get("log", False))
            )
    return values


# ---------------------------------------------------------------- study


# optuna's retry of a trial whose worker's heartbeat stopped (renamed in optuna 4.9)
RETRY = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # its retry callback and plots


def open_study(tune: TuneConfig, name: str, worker: int = 0) -> optuna.Study:
    """Create or load the study. `worker` offsets the sampler seed, so that several workers started
    together on one study do not draw the same parameters."""
    url = tune.storage or os.environ.get("OPTUNA_STORAGE") or f"sqlite:///{repository_root() / 'optuna.db'}"
    for attempt in range(3):  # workers started together race to create the tables: a second try loads them
        try:
            storage = optuna.storages.RDBStorage(
                url,
                heartbeat_interval=tune.heartbeat_seconds,
                grace_period=2 * tune.heartbeat_seconds,
                # a trial whose worker died is failed, then queued again with its parameters (and the
                # epochs it had reported); the retry's system attrs name the failed trial
                heartbeat_stale_trial_callback=RETRY(max_retry=tune.max_retry, inherit_intermediate_values=True),
            )
            break
        except Exception as exc:  # SQLAlchemy raises many kinds; all mean the same to the user
            if attempt == 2:
                raise PipelineError(
                    f"tune.storage: cannot open '{url}' ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})"
                ) from None
            time.sleep(0.5 + random.random())
    seed = tune.seed + 1000 * worker
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=seed),
    }
    pruners = {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=tune.startup_trials),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(),
        "none": lambda: optuna.pruners.NopPruner(),
    }
    direction = metric_direction(tune.metric)
    for attempt in range(3):
        try:
            study = optuna.create_study(
                storage=storage,
                study_name=name,
                direction=direction,
                sampler=samplers[tune.sampler](),
                pruner=pruners[tune.pruner](),
                load_if_exists=True,
            )
            break
        except ValueError as exc:
            raise PipelineError(f"study '{name}' in {url}: {exc}") from None
        except Exception:  # two workers creating the same study at once: load it on the next try
            if attempt == 2:
                raise
            time.sleep(0.5 + random.random())
    if study.direction.name.lower() != direction:
        raise PipelineError(
            f"study '{name}' in {url} was created to {study.direction.name.lower()}, "
            f"but tune.metric={tune.metric} needs {direction}: use another storage or study"
        )
    return study


# settings that change how fast a trial runs, never its value: a change keeps the study
NOT_HASHED = {"num_workers", "compile"}


def study_settings(data: PreparedData, backbone: Backbone, space: dict, tune: TuneConfig) -> dict:
    """What a trial's value means: the search space, the folds, epochs and metric a trial is scored
    by, the backbone's resolved base settings and the data (ids, classes, fold assignment). A study
    holds only trials scored under one such set; `tune.n_trials`, the sampler, pruner and storage
    are how many and how to search, and may change within a study."""
    digest = hashlib.sha256("\n".join(data.train["id"].astype(str)).encode())
    digest.update(np.stack([data.targets, data.folds]).astype(np.int64).tobytes())
    base = {k: v for k, v in asdict(backbone.settings).items() if k not in NOT_HASHED}
    return {
        "space": space,
        "folds": list(tune.folds),
        "epochs": tune.epochs or backbone.settings.epochs,
        "metric": tune.metric,
        "model": backbone.model_name,
        "pretrained": str(backbone.pretrained),
        "image_size": backbone.settings.image_size or backbone.image_size,
        "settings": base,
        "data": digest.hexdigest(),
    }


def study_name(params: Params, backbone: Backbone, settings: dict) -> str:
    """`<experiment>-<backbone>-<8 hex digits of the settings' hash>`: a changed space, tune setting,
    base training setting or data set starts a new study; an unchanged one continues."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return f"{experiment_name(params)}-{backbone.name}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def finished(study: optuna.Study) -> int:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def _fold_score(
    trial: optuna.Trial,
    i: int,
    k: int,
    data: PreparedData,
    backbone: Backbone,
    settings: TrainSettings,
    tune: TuneConfig,
    device: torch.device,
    tracker,
) -> float:
    """Fold k (the trial's i-th) trained as the train stage trains it, reporting every validated epoch
    to the pruner at step `i * epochs + epoch`; its validation `tune.metric`."""
    metric = f"val_{tune.metric}"

    def report(epoch: int, row: dict) -> None:
        if metric not in row:  # an epoch without validation (train.val_every)
            return
        tracker.log_metrics({metric: row[metric]}, step=epoch)
        trial.report(row[metric], step=i * settings.epochs + epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"fold {k}, epoch {epoch + 1}: {tune.metric} {row[metric]:.4f}")

    with tracker.run(f"fold{k}", params={"fold": k}, nested=True):
        result, _ = train_fold(
            data,
            k,
            replace(backbone, settings=settings),
            device,
            on_epoch=report,
            where=f"trial {trial.number} fold {k}",
        )
    return data.task.scores(result.val_probs, data.targets[data.folds == k], (tune.metric,))[tune.metric]


def make_objective(
    data: PreparedData, backbone: Backbone, space: dict, tune: TuneConfig, device: torch.device, tracker
):
    """The objective: mean validation score over `tune.folds`, each fold set up by `train_fold` exactly as
    the train stage sets it up (finetune mode, bootstrap, seeds), for `tune.epochs` epochs; `backbone`'s
    settings are the base the trial's sampled values replace."""
    base = backbone.settings
    epochs = tune.epochs or base.epochs

    def objective(trial: optuna.Trial) -> float:
        values = sample(trial, space, base)
        settings = replace(base, **values, epochs=epochs)
        check_train_settings(settings, "tune")
        with tracker.run(f"trial {trial.number}", params=values, nested=True, tags={"optuna.trial": str(trial.number)}):
            state = "COMPLETE"
            try:
                value = float(
                    np.mean(
                        [
                            _fold_score(trial, i, k, data, backbone, settings, tune, device, tracker)
                            for i, k in enumerate(tune.folds)
                        ]
                    )
                )
            except optuna.TrialPruned:
                state = "PRUNED"
                raise
            except FAILURES as exc:
                state = "FAIL"
                trial.set_user_attr("fail_reason", str(exc))
                raise
            finally:
                tracker.log_params({"state": state})
            tracker.log_metrics({f"cv_{tune.metric}": value})
            return value

    return objective


def run_study(study: optuna.Study, objective, n_trials: int, name: str = "tune") -> None:
    """Run trials until the study holds `n_trials` finished ones (counting earlier runs and other workers)."""
    remaining = n_trials - finished(study)
    if remaining <= 0:
        return
    stop = optuna.study.MaxTrialsCallback(
        n_trials, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    )
    progress = StageProgress(name, n_trials, "trials")
    progress.skip(finished(study))

    def report(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        progress.skip(max(finished(study) - progress.done - 1, 0))  # other workers' trials
        print(f"{progress.step()} (trial {trial.number}: {trial.state.name.lower()})", flush=True)

    # a failed trial (e.g. a NaN loss) is recorded with its reason and the study goes on
    study.optimize(
        objective, n_trials=remaining + n_trials, callbacks=[stop, report], catch=FAILURES, gc_after_trial=True
    )


# ---------------------------------------------------------------- report


def _save(ax, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.figure.set_size_inches(7, 4)
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=100)
    plt.close(ax.figure)


def write_report(study: optuna.Study, out_dir: str | Path) -> dict:
    """Best trial, and optuna's own history and importance plots (PNG) into `out_dir`; returns the
    summary for DVC metrics."""
    import matplotlib

    matplotlib.use("Agg")

    out_dir = Path(out_dir)
    trials = study.get_trials(deepcopy=False)
    count = {s.name.lower(): sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    summary = {"n_complete": count["complete"], "n_pruned": count["pruned"], "n_failed": count["fail"]}
    if not done:
        return summary
    best = study.best_trial
    summary.update({"best_value": best.value, "best_trial": best.number, "best_params": best.params})

    ax = optuna.visualization.matplotlib.plot_optimization_history(study, target_name="CV score")
    _save(ax, out_dir / "history.png")
    if len(done) >= 2 and len({tuple(sorted(t.params.items())) for t in done}) >= 2:
        try:
            importances = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError):
            importances = {}
        if importances:
            summary["importances"] = importances
            _save(optuna.visualization.matplotlib.plot_param_importances(study), out_dir / "importances.png")
    return summary


def write_disabled(out_dir: str | Path) -> None:
    """tune.enabled false: an empty best_params.yaml, so the train stage's inputs exist either way."""
    with atomic_dir(out_dir) as out:
        (out / "best_params.yaml").write_text(yaml.safe_dump({"enabled": False, "params": {}}))


def write_best(study: optuna.Study, tune: TuneConfig, out_dir: str | Path) -> dict:
    """`out_dir`: best_params.yaml (what the train stage reads) and the study's plots; returns the summary."""
    with atomic_dir(out_dir) as out:
        summary = write_report(study, out)
        best = {
            "enabled": True,
            "study": study.study_name,
            "metric": tune.metric,
            "value": summary.get("best_value"),
            "trial": summary.get("best_trial"),
            "params": summary.get("best_params", {}),
        }
        (out / "best_params.yaml").write_text(yaml.safe_dump(best, sort_keys=False))
    return summary


def tune_stage(
    params: Params, backbone: Backbone, data: PreparedData, device: torch.device, out: Path, worker: int = 0
) -> dict:
    """The tune stage's work: the backbone's study (named by `study_name`, continued if it exists) run
    up to `tune.n_trials` finished trials, in one MLflow run with a nested run per trial; writes
    `out` (tuning/<backbone>/) and returns the study's summary."""
    tune, name = params.tune, backbone.name
    space = search_space(tune, name)
    settings = study_settings(data, backbone, space, tune)
    study = open_study(tune, study_name(params, backbone, settings), worker=worker)
    if "settings" not in study.user_attrs:  # what its trials were scored under, readable in the storage
        study.set_user_attr("settings", json.loads(json.dumps(settings, default=str)))
    print(f"tune {name}: study '{study.study_name}', {finished(study)}/{tune.n_trials} trials finished so far")
    tracker = Tracker(params.tracking.enabled, experiment_name(params))
    run_params = {
        "study": study.study_name,
        "n_trials": tune.n_trials,
        "folds": str(tune.folds),
        "epochs": tune.epochs,
        "metric": tune.metric,
        "space": str(space),
    }
    with tracker.run(f"tune {name}", params=run_params, tags={"stage": "tune", "backbone": name}):
        run_study(study, make_objective(data, backbone, space, tune, device, tracker), tune.n_trials, f"tune@{name}")
        summary = write_best(study, tune, out)
        tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    return summary
