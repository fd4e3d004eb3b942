"""`train` stage: k-fold cross-validated training of one timm backbone, bagged over seeds.

    python -m pipeline train --backbone resnet10t    # writes models/resnet10t/, reports/train/resnet10t.json

From the outside in: `train_backbone` bags `cross_validate` over `train.seeds`; `cross_validate` runs
`train_fold` (pipeline/fold.py) for every fold of one seed, keeping finished folds for a resumed run and
reporting each to its `FoldLog`; `train_fold` sets one fold up (its rows, its normalisation, a fresh model,
its precision) and trains it through the project's one loop (`pipeline.loop.fit`) or fits the
features+sklearn head. Tuning and the plan's speed probe call `train_fold` too, so a fold is set up the
same way everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import numpy as np
import torch
import yaml
from tqdm import tqdm

from pipeline import distributed
from pipeline.backbone import Backbone
from pipeline.config import Params, flatten, to_dict
from pipeline.data import PreparedData, build_train_transform
from pipeline.fold import fold_units, train_fold
from pipeline.io import StageProgress, atomic_dir
from pipeline.metrics import fold_summary
from pipeline.resume import FoldResult, load_finished, save_finished
from pipeline.sklearn_head import CLASSIFIER_FILE, save_classifier
from pipeline.tasks import Task
from pipeline.tracking import Tracker, experiment_name


def _fold_scores(result: FoldResult, targets: np.ndarray, task: Task) -> dict:
    """The fold's scores and `best_epoch`, the epochs trained to the weights kept (a fraction, not 3,
    after a 2.5-epoch plan's last pass), as the refit reads them."""
    return {
        **task.scores(result.val_probs, targets),
        "best_epoch": result.kept.get("epochs_done", result.best_epoch + 1),
    }


def fold_curve(result: FoldResult) -> list[dict]:
    """The fold's epochs as the report reads them (does more training pay?): each one's training loss and,
    where it was validated, its validation scores."""
    keep = ("train_loss",)
    return [
        {"epoch": i + 1, **{k: v for k, v in row.items() if k in keep or k.startswith("val_")}}
        for i, row in enumerate(result.history)
    ]


def _save_fold(result: FoldResult, ckpt: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, folder / "model.pt")
    if result.classifier is not None:
        save_classifier(result.classifier, folder / CLASSIFIER_FILE)


@dataclass
class FoldLog:
    """Where the folds of one seed report: a nested MLflow run per fold in `tracker`, the stage's progress line
    (`progress`; None: one for these folds alone) and the prefix of each fold run's name (seed<s>- in a bag)."""

    tracker: object
    progress: StageProgress | None = None
    run_prefix: str = ""

    def start(self, name: str, units: float) -> None:
        if self.progress is None:
            self.progress = StageProgress(f"train@{name}", units, "epochs")

    def fold_run(self, k: int, seed: int, n_train: int, n_val: int, resume: Path | None):
        return self.tracker.run(
            f"{self.run_prefix}fold{k}",
            params={"fold": k, "seed": seed, "n_train": n_train, "n_val": n_val},
            nested=True,
            resume=resume,
        )


def cross_validate(
    data: PreparedData,
    backbone: Backbone,
    out_dir: str | Path,
    device: torch.device,
    log: FoldLog,
    resume_dir: str | Path | None = None,
) -> tuple[np.ndarray, dict]:
    """k-fold CV of one backbone with one seed (its settings'). Writes `out_dir/fold<k>/model.pt`; returns
    (oof_probs, metrics).

    Each trained fold's model (`trained_folds`) fills the OOF probabilities of its validation rows, which are
    the OOF's rows, in the prepared order. With `resume_dir`, finished
    folds and the unfinished fold's last epoch are kept there and picked up by the next call.
    """
    out_dir, resume_dir = Path(out_dir), Path(resume_dir) if resume_dir else None
    if resume_dir is not None:
        resume_dir.mkdir(parents=True, exist_ok=True)
    targets, folds, task = data.targets, data.folds, data.task
    trained = trained_folds(backbone, data)
    rows = np.flatnonzero(folds < trained)  # the OOF's rows: those the trained folds validate
    oof = np.zeros((len(rows), task.n_outputs), dtype=np.float64)
    fold_metrics, curves = {}, {}
    log.start(backbone.name, trained * fold_units(backbone.settings))
    for k in range(trained):
        va = np.flatnonzero(folds == k)
        result, ckpt = _train_or_keep_fold(data, k, backbone, device, log, resume_dir)
        oof[np.searchsorted(rows, va)] = result.val_probs
        fold_metrics[str(k)] = _fold_scores(result, targets[va], task)
        curves[str(k)] = fold_curve(result)
        if distributed.is_main():  # under torchrun only rank 0 writes
            _save_fold(result, ckpt, out_dir / f"fold{k}")
        distributed.barrier()
    metrics = {
        "oof": task.scores(oof, targets[rows]),
        **fold_summary(fold_metrics, task.METRICS),
        "folds": fold_metrics,
        "curves": curves,
        "monitor": backbone.settings.monitor,
        "input_size": backbone.input_side,
        "precision": ckpt.get("precision"),
        "precision_probe": ckpt.get("precision_probe"),
    }
    return oof, metrics


def trained_folds(backbone: Backbone, data: PreparedData) -> int:
    """How many folds (0..m-1) this backbone trains: `cv.train_folds` as the plan resolved it, else all."""
    return backbone.folds or data.n_folds


def _train_or_keep_fold(
    data: PreparedData, k: int, backbone: Backbone, device, log: FoldLog, resume_dir: Path | None
) -> tuple[FoldResult, dict]:
    """Fold k trained (in its own nested MLflow run), or kept whole from a killed run's `resume_dir`."""
    s, tracker, progress = backbone.settings, log.tracker, log.progress
    done = resume_dir / f"fold{k}.done.pt" if resume_dir else None
    units, counted = fold_units(s), 0.0  # the fold's epochs counted by `progress` (a last one as its share)

    def on_epoch(epoch: int, row: dict) -> None:
        nonlocal counted
        tracker.log_metrics(row, step=epoch)
        progress.skip(min(epoch, units) - counted)  # epochs kept from a killed run
        counted = min(epoch + 1, units)
        line = progress.step(counted - min(epoch, units))
        if distributed.is_main():
            tqdm.write(line)

    if done is not None and done.exists():
        result, ckpt = load_finished(done)
        tqdm.write(f"{backbone.name} fold{k}: finished in an earlier run, kept")
    else:
        n_val = int((data.folds == k).sum())
        run_id = resume_dir / f"fold{k}.mlflow_run_id" if resume_dir else None
        with log.fold_run(k, s.seed, len(data.folds) - n_val, n_val, run_id):
            result, ckpt = train_fold(
                data,
                k,
                backbone,
                device,
                on_epoch=on_epoch,
                state_path=resume_dir / f"fold{k}.state.pt" if resume_dir else None,
                where=f"{backbone.name} fold {k}",
            )
            tracker.log_metrics(
                {f"best_{m}": v for m, v in _fold_scores(result, data.targets[data.folds == k], data.task).items()}
            )
        if done is not None and distributed.is_main():
            save_finished(result, ckpt, done)
            (resume_dir / f"fold{k}.state.pt").unlink(missing_ok=True)
    progress.skip(units - counted)  # a fold kept whole, or stopped early
    return result, ckpt


def train_backbone(
    data: PreparedData,
    backbone: Backbone,
    out_dir: str | Path,
    device: torch.device,
    tracker,
    resume_dir: str | Path | None = None,
) -> tuple[np.ndarray, dict]:
    """k-fold CV of one backbone, once per seed of `train.seeds` (bagging). Writes
    `out_dir/seed<s>/fold<k>/model.pt`; returns (oof_probs, metrics), the OOF being the mean over seeds.

    `metrics` holds the bag's scores (`oof`, per fold, their mean and std) and each seed's own under
    `seeds`, so one seed can be compared with the bag.
    """
    s = backbone.settings
    targets, folds = data.targets, data.folds
    seeds = s.seeds or [s.seed]
    oofs, per_seed = [], {}
    trained = trained_folds(backbone, data)
    progress = StageProgress(f"train@{backbone.name}", len(seeds) * trained * fold_units(s), "epochs")
    for seed in seeds:
        oof, metrics = cross_validate(
            data,
            dataclasses.replace(backbone, settings=dataclasses.replace(s, seed=seed)),
            Path(out_dir) / f"seed{seed}",
            device,
            FoldLog(tracker, progress, f"seed{seed}-" if len(seeds) > 1 else ""),
            Path(resume_dir) / f"seed{seed}" if resume_dir else None,
        )
        oofs.append(oof)
        per_seed[str(seed)] = metrics
    bag = np.mean(oofs, axis=0)
    task = data.task
    rows = folds < trained
    per_fold = {str(k): task.scores(bag[folds[rows] == k], targets[folds == k]) for k in range(trained)}
    first = per_seed[str(seeds[0])]
    return bag, {
        "oof": task.scores(bag, targets[rows]),
        "folds_trained": trained,
        **fold_summary(per_fold, task.METRICS),
        "folds": per_fold if len(seeds) > 1 else first["folds"],
        "seeds": {seed: m["oof"] for seed, m in per_seed.items()},
        "bootstrap": s.bootstrap,
        **{k: first[k] for k in ("curves", "monitor", "input_size")},
        "precision": first["precision"],
        "precision_probe": first["precision_probe"],
    }


def train_stage(
    params: Params,
    backbone: Backbone,
    data: PreparedData,
    device: torch.device,
    record: dict,
    resume_dir: Path,
    out: Path,
) -> dict:
    """The train stage's work: train the backbone into `out` (models/<name>/, swapped in whole when it is done),
    beside its OOF probabilities, resolved params and augmentation record; every fold in a nested MLflow
    run of the backbone's run, which a resumed stage continues. Returns the metrics."""
    main = distributed.is_main()
    s, out_path = backbone.settings, Path(out)
    tracker = Tracker(params.tracking.enabled and main, experiment_name(params))
    with tracker.run(
        backbone.name,
        params=flatten(record),
        tags={"stage": "train", "backbone": backbone.name},
        resume=Path(resume_dir) / "mlflow_run_id",
    ):
        with atomic_dir(out_path) if main else tempfile.TemporaryDirectory() as out:
            oof, metrics = train_backbone(data, backbone, out, device, tracker, resume_dir=resume_dir)
            if main:
                ids = data.train["id"][data.folds < trained_folds(backbone, data)]
                data.task.frame(ids, oof).to_csv(out / "oof_probs.csv", index=False)
                (out / "params.yaml").write_text(yaml.safe_dump({"resolved": record, "params": to_dict(params)}))
                (out / "augment.json").write_text(
                    json.dumps(A.to_dict(build_train_transform(s.augment, s.seed, p=s.augment_p)), indent=2)
                )  # A.from_dict replays it
        for name in ("augment.json", "oof_probs.csv", "params.yaml"):
            tracker.log_artifact(f"{out_path}/{name}")
        if params.tracking.log_models:
            for seed_dir in sorted(Path(out_path).glob("seed*")):
                tracker.log_artifacts(str(seed_dir), f"models/{seed_dir.name}")
        else:  # stored once, by DVC: the run says where (dvc.lock holds that folder's hash)
            tracker.set_tags({"models": f"{out_path} (DVC output of train@{backbone.name})"})
        probe = metrics["precision_probe"] or {}  # no native bf16: not timed, None and why
        tracker.log_params(
            {
                "precision_chosen": metrics["precision"],
                **{f"probe_{k}": v if isinstance(v, str) else v and round(v, 1) for k, v in probe.items()},
            }
        )
        tracker.log_metrics({f"cv_{m}": v for m, v in metrics["oof"].items()})
        tracker.log_metrics({f"cv_fold_mean_{m}": v for m, v in metrics["fold_mean"].items()})
    return metrics
