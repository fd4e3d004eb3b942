"""`refit` stage: after cross-validation, one model per seed of `refit.seeds` trained on every training row
(cv.holdout's stay out), for what CV chose, predicting the test set (and cv.holdout) with the TTA policy
the predict stage chose on OOF.

    python -m pipeline refit --backbone resnet10t    # writes refit/resnet10t/, reports/refit/resnet10t.json

What CV chose is read from the fold checkpoints (models/<b>/seed<s>/fold<k>/model.pt): each fold's epochs
to the weights it kept (its best validated epoch) and whether those were the EMA's. A refit model trains
for the mean of those epochs, fractional where the mean is: as many passes over its rows as a fold's
kept weights made over theirs (AutoGluon's refit_full rule), so k/(k-1) times a fold's updates on
k/(k-1) times its rows. Its LR schedule (warmup, decay) spans its own epochs; it runs the EMA and keeps
its weights if most folds kept EMA weights, else no EMA; no early stopping, no validation. Nothing is
chosen here: no row is left to choose on. features+sklearn refits the head on every row's features.

A refit model has no OOF predictions, so it never enters a choice fitted on OOF (TTA policy, ensemble
weights, method, thresholds): the ensemble stage fits all of them on the fold models' OOF and applies
them to each backbone's test predictions as `refit.rule` makes them (pipeline/ensemble.py). With
`refit.enabled: false` the stage writes refit.json alone and the ensemble uses the fold bags.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.backbone import Backbone, apply_plan
from pipeline.config import TrainSettings
from pipeline.data import PreparedData
from pipeline.errors import PipelineError
from pipeline.fold import train_fold
from pipeline.inference import fold_input_config, load_fold_model
from pipeline.io import load_checkpoint, write_json
from pipeline.paths import REFIT_RECORD, list_models
from pipeline.resume import load_finished, save_finished
from pipeline.sklearn_head import CLASSIFIER_FILE, save_classifier
from pipeline.tta import predict_tta


def cv_choices(model_dir: str | Path, n_folds: int) -> dict:
    """What every fold model (x seed) of `model_dir` kept: the epochs trained to its weights, whether they
    were the EMA's, and its training rows, read from the checkpoints (weights_only)."""
    paths = [p for fold in list_models(model_dir, n_folds).values() for p in fold]
    ckpts = [load_checkpoint(p, "train this backbone again (dvc repro -f train@<backbone>)") for p in paths]
    missing = [str(p) for p, c in zip(paths, ckpts) if "epochs_kept" not in c]
    if missing:
        raise PipelineError(f"{missing[0]}: written before checkpoints kept their epochs; train the backbone again")
    return {
        "epochs": [float(c["epochs_kept"]) for c in ckpts],
        "ema": [bool(c["ema_chosen"]) for c in ckpts],
        "train_rows": [int(c["train_rows"]) for c in ckpts],
    }


def refit_settings(s: TrainSettings, choices: dict) -> TrainSettings:
    """`s` (the backbone's settings as its folds trained: tuned, planned) as a refit trains: the mean of the
    folds' kept epochs (the points in the schedule that params name in epochs, mixup_off_epoch and
    unfreeze_epoch, moved with them), EMA only if most folds kept EMA weights, no early stopping, one
    model on all rows (no bootstrap, no bag: `refit.seeds` is the refit's)."""
    if s.finetune != "features+sklearn":
        epochs = float(np.mean(choices["epochs"]))
        s = apply_plan(s, {"epochs": epochs, "val_every": s.val_every})
    ema = s.ema_decay if sum(choices["ema"]) * 2 > len(choices["ema"]) else None
    return dataclasses.replace(s, ema_decay=ema, early_stopping_patience=None, bootstrap=False, seeds=None)


def _save(result, ckpt: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, folder / "model.pt")
    if result.classifier is not None:
        save_classifier(result.classifier, folder / CLASSIFIER_FILE)


def refit_models(
    data: PreparedData, backbone: Backbone, seeds: list[int], out: Path, device: torch.device, resume: Path
) -> list[dict]:
    """Train one refit model of `backbone` (settings already `refit_settings`) per seed on every training row
    (`train_fold` with no fold), into `out`/seed<s>/model.pt. A killed run continues from `resume`:
    finished seeds are kept whole, the unfinished one from its last epoch. Returns each model's record."""
    resume.mkdir(parents=True, exist_ok=True)
    records = []
    for seed in seeds:
        done, state = resume / f"seed{seed}.done.pt", resume / f"seed{seed}.state.pt"
        if done.exists():
            result, ckpt = load_finished(done)
            tqdm.write(f"{backbone.name} refit seed {seed}: finished in an earlier run, kept")
        else:
            bb = dataclasses.replace(backbone, settings=dataclasses.replace(backbone.settings, seed=seed))
            result, ckpt = train_fold(data, None, bb, device, state_path=state, where=f"{backbone.name} refit")
            save_finished(result, ckpt, done)
            state.unlink(missing_ok=True)
        _save(result, ckpt, out / f"seed{seed}")
        last = result.history[-1] if result.history else {}
        records.append({"seed": seed, "train_rows": ckpt["train_rows"], "train_loss": last.get("train_loss")})
    return records


def predict_refit(
    data: PreparedData, out: Path, tta: dict, batch_size: int, device: torch.device
) -> dict[str, np.ndarray]:
    """The test (and cv.holdout) predictions of the refit models in `out`, each under the TTA views and merge
    its backbone's predict stage chose (`tta`, predictions/<b>/tta.json), averaged over the models."""
    parts = {"test": data.test_images, **({} if data.holdout is None else {"holdout": data.holdout_images})}
    sums = {part: 0.0 for part in parts}
    paths = sorted(out.glob("seed*/model.pt"))
    for path in paths:
        model, ckpt = load_fold_model(path, device)
        cfg, task = fold_input_config(ckpt, device), data.task.for_model(ckpt)
        for part, images in parts.items():
            views = tuple(tta["views"])
            sums[part] = sums[part] + predict_tta(model, images, cfg, batch_size, device, views, task, tta["merge"])
    return {part: total / len(paths) for part, total in sums.items()}


def write_refit(out: Path, data: PreparedData, probs: dict[str, np.ndarray], record: dict) -> None:
    """`out` (refit/<b>/): test_probs.csv (and holdout_probs.csv) as the task writes predictions, refit.json."""
    task = data.task
    task.frame(data.test["id"], probs["test"]).to_csv(out / "test_probs.csv", index=False)
    if "holdout" in probs:
        task.frame(data.holdout["id"], probs["holdout"]).to_csv(out / "holdout_probs.csv", index=False)
    write_json(out / REFIT_RECORD, record)


def refit_record(backbone: Backbone, choices: dict, seeds: list[int], tta: dict, models: list[dict]) -> dict:
    """refit.json: what the refit trained (epochs, updates' basis, EMA), on what, and how it predicted."""
    s = backbone.settings
    return {
        "enabled": True,
        "epochs": s.epochs,
        "fold_epochs_kept": choices["epochs"],
        "fold_train_rows": choices["train_rows"],
        "ema": s.ema_decay is not None,
        "folds_kept_ema": sum(choices["ema"]),
        "finetune": s.finetune,
        "seeds": seeds,
        "models": models,
        "policy": tta["policy"],
        "views": tta["views"],
        "merge": tta["merge"],
    }
