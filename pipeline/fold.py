"""One fold set up and trained: its rows, its normalisation, a fresh model, its precision, then the
project's one loop (`pipeline.loop.fit`) or the features+sklearn head. CV training (pipeline/train.py),
tuning trials and the plan's speed probe all call `train_fold`, so a fold is set up the same way everywhere."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.backbone import Backbone
from pipeline.config import TrainSettings
from pipeline.data import InputConfig, PreparedData, Rows
from pipeline.inference import extract_features
from pipeline.loop import Split, derive_seed, fit
from pipeline.models import Pretrained, create_model
from pipeline.precision import cached_probe, resolve_precision
from pipeline.resume import FoldResult
from pipeline.sklearn_head import feature_extractor, fit_classifier, fit_regressor
from pipeline.tasks import Task

REFIT_KEY = -1  # a full-data refit's seed is derived from (seed, REFIT_KEY), a fold's from (seed, k)


def bootstrap_rows(rows: np.ndarray, seed: int, fold: int) -> np.ndarray:
    """A bootstrap resample (same size, with replacement) of a fold's training rows, fixed by (seed, fold)."""
    rng = np.random.default_rng([seed, fold])
    return np.sort(rng.choice(rows, size=len(rows), replace=True))


def initial_model(
    model_name: str, n_outputs: int, s: TrainSettings, fold_seed: int, pretrained: Pretrained = None
) -> torch.nn.Module:
    """A fold's model before training, with a head of `n_outputs` (0: none), its random initialisation drawn
    from `fold_seed`; with `s.dirac_init` (from scratch only), every 3x3 conv's first min(in, out) output
    channels pass their input channel through."""
    torch.manual_seed(fold_seed)
    model = create_model(
        model_name, n_outputs, pretrained=pretrained, drop_rate=s.drop_rate, drop_path_rate=s.drop_path_rate
    )
    if s.dirac_init and not pretrained:
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and m.groups == 1:
                torch.nn.init.dirac_(m.weight.data[: m.in_channels])
    return model


def fold_units(s: TrainSettings) -> float:
    """A fold's units of progress: its epochs, a fractional last one as its share (one fit for features+sklearn)."""
    return 1.0 if s.finetune == "features+sklearn" else float(s.epochs)


def fold_rows(data: PreparedData, k: int | None, s: TrainSettings) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) rows of fold k: the other folds' rows (a bootstrap resample of them if
    `s.bootstrap`) and fold k's. k None: a full-data refit, every training row (cv.holdout's are not among
    them) and none to validate on."""
    if k is None:
        return np.arange(len(data.folds)), np.zeros(0, dtype=np.int64)
    tr, va = np.flatnonzero(data.folds != k), np.flatnonzero(data.folds == k)
    return (bootstrap_rows(tr, s.seed, k) if s.bootstrap else tr), va


def train_fold(
    data: PreparedData,
    k: int | None,
    backbone: Backbone,
    device: torch.device,
    *,
    on_epoch: Callable[[int, dict], None] | None = None,
    state_path: str | Path | None = None,
    where: str = "fold",
) -> tuple[FoldResult, dict]:
    """One fold of `backbone` (its settings `s`), set up the one way CV training, tuning and the speed probe
    share: a fresh model (seeded from `s.seed` and k) trained on the other folds' rows (a bootstrap resample of
    them if `s.bootstrap`), normalised as `backbone.normalization` says, validated on fold k, in the
    `s.finetune` mode. k None: a full-data refit (`fold_rows`), trained for `s.epochs` and never validated.
    Returns (result, checkpoint)."""
    s, model_name, pretrained = backbone.settings, backbone.model_name, backbone.pretrained
    image_size, targets = backbone.input_side, data.targets
    tr, va = fold_rows(data, k, s)
    task = data.task.fit_target(targets[tr], s)  # what the task fits (a regression's scaling): training rows only
    mean, std = backbone.normalization(data, k)
    fold_seed = derive_seed(s.seed, REFIT_KEY if k is None else k)
    sklearn_head = s.finetune == "features+sklearn"
    model = initial_model(model_name, 0 if sklearn_head else task.n_outputs, s, fold_seed, pretrained)
    precision, probe = resolve_precision(
        s.precision, device, lambda: cached_probe(model, model_name, s.finetune, s.batch_size, image_size, device)
    )
    cfg = InputConfig(image_size, tuple(mean), tuple(std), backbone.interpolation, precision)
    train = Split(Rows(data.train_images, tr), targets[tr])  # read per batch
    val = Split(Rows(data.train_images, va), targets[va]) if k is not None else None
    if sklearn_head:
        result = _fit_sklearn_head(model, train, val, cfg, s, device, task)
        if on_epoch is not None and val is not None:  # one "epoch": the classifier's fit
            on_epoch(0, {f"val_{m}": v for m, v in task.scores(result.val_probs, val.targets).items()})
    else:
        result = fit(
            model,
            train,
            val,
            cfg,
            dataclasses.replace(s, seed=fold_seed),
            device,
            task=task,
            on_epoch=on_epoch,
            state_path=state_path,
            where=where,
            data_init=not pretrained,
        )
    return result, _checkpoint(backbone, task, result, cfg, k, probe, len(tr))


def _checkpoint(
    backbone: Backbone, task: Task, result: FoldResult, cfg: InputConfig, k: int | None, probe, train_rows: int
) -> dict:
    """What a fold's model.pt holds: the weights, how to feed them (`cfg`), where they came from, and what
    the fold chose (the epochs trained to the weights kept, whether they were the EMA's): a refit reads it."""
    s = backbone.settings
    kept = result.kept
    return {
        "model": backbone.model_name,
        "num_classes": task.n_outputs,  # the head's size (the checkpoint format's name, timm's)
        "state_dict": result.state_dict,
        **cfg.checkpoint_fields(),
        "fold": k,  # None: a full-data refit
        "seed": s.seed,
        "train_rows": train_rows,
        "epochs_kept": kept.get("epochs_done", 0.0),  # 0: features+sklearn, no epochs
        "ema_chosen": bool(kept.get("ema_chosen", False)),
        "precision_probe": probe,
        "sklearn_head": s.finetune == "features+sklearn",
        "feature_layer": s.feature_layer,  # features+sklearn: the stage its classifier reads
        "target_scale": task.target_state,  # a regression's scaling, fitted on the fold's training rows
    }


def _fit_sklearn_head(
    model: torch.nn.Module,
    train: Split,
    val: Split | None,
    cfg: InputConfig,
    s: TrainSettings,
    device: torch.device,
    task,
) -> FoldResult:
    """features+sklearn: frozen backbone features -> a scikit-learn classifier (a regression: a ridge on the
    target as the task scales it, its predictions back in units, as a trained head's outputs are); `val`
    None (a refit): nothing predicted."""
    model.to(device)
    features = feature_extractor(model, s.feature_layer)
    train_x = extract_features(features, train.images, cfg, s.batch_size * 2, device)
    if task.target_state is not None:
        head = fit_regressor(train_x, task.to_model_space(train.targets))
        outputs = lambda x: task.outputs(torch.from_numpy(head.predict(x)).reshape(-1, 1)).numpy()  # noqa: E731
    else:
        head = fit_classifier(train_x, train.targets, s.sklearn_classifier)
        outputs = head.predict_proba
    if val is None:
        return FoldResult(model.state_dict(), np.zeros((0, task.n_outputs)), 0, classifier=head)
    val_x = extract_features(features, val.images, cfg, s.batch_size * 2, device)
    return FoldResult(model.state_dict(), outputs(val_x), 0, classifier=head)
