"""`train` stage: k-fold cross-validated training of one timm backbone.

    python -m pipeline train --backbone resnet10t    # writes models/resnet10t/, reports/train/resnet10t.json

The one training loop of the project: `train_one_epoch`, `evaluate` and `train_fold` take what
they need as arguments and are reused by every caller (CV here, tuning and refits later).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.data import ImageDataset, PreparedData, build_loader, build_train_transform, to_input
from pipeline.metrics import scores
from pipeline.models import amp_dtype, create_model
from pipeline.predict import predict_proba


@dataclass(frozen=True)
class FoldSettings:
    """Everything `train_fold` needs besides the data and the model."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_epochs: float
    image_size: int
    hflip: bool
    translate: float
    monitor: str
    num_workers: int
    seed: int


@dataclass
class FoldResult:
    state_dict: dict
    val_probs: np.ndarray
    best_epoch: int
    history: list[dict] = field(default_factory=list)


def _cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def train_one_epoch(model, loader, optimizer, scheduler, device, mean, std, image_size: int,
                    scaler: torch.amp.GradScaler | None = None, desc: str | None = None) -> float:
    """One pass over `loader`; returns the mean training loss."""
    model.train()
    dtype = amp_dtype(device)
    channels_last = device.type == "cuda"
    total, count = 0.0, 0
    for images, targets in tqdm(loader, desc=desc, disable=None if desc else True, leave=False, mininterval=1.0):
        x = to_input(images, mean, std, image_size, device, channels_last)
        y = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        total += loss.item() * len(y)
        count += len(y)
    return total / max(1, count)


def evaluate(model, images: np.ndarray, targets: np.ndarray, mean, std, image_size: int, batch_size: int,
             device: torch.device) -> tuple[dict[str, float], np.ndarray]:
    """Validation scores and probabilities (no augmentation)."""
    probs = predict_proba(model, images, mean, std, image_size, batch_size, device)
    return scores(probs, targets), probs


def _is_better(metric: str, new: dict, best: dict | None) -> bool:
    if best is None:
        return True
    if metric == "log_loss":
        return new["log_loss"] < best["log_loss"]
    return (new[metric], -new["log_loss"]) > (best[metric], -best["log_loss"])


def train_fold(model: torch.nn.Module, train_images: np.ndarray, train_targets: np.ndarray,
               val_images: np.ndarray, val_targets: np.ndarray, mean, std, settings: FoldSettings,
               device: torch.device, on_epoch: Callable[[int, dict], None] | None = None,
               desc: str = "") -> FoldResult:
    """Train `model` on one fold's training part, validate every epoch, keep the best epoch's weights."""
    s = settings
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    transform = build_train_transform(train_images.shape[1], s.hflip, s.translate, s.seed)
    loader = build_loader(ImageDataset(train_images, train_targets, transform), s.batch_size, True,
                          s.num_workers, s.seed, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    steps = s.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _cosine_with_warmup(steps, max(1, int(s.warmup_epochs * len(loader))))
    )
    scaler = torch.amp.GradScaler("cuda") if amp_dtype(device) == torch.float16 else None

    best, result, history = None, None, []
    for epoch in range(s.epochs):
        start = time.perf_counter()
        train_loss = train_one_epoch(model, loader, optimizer, scheduler, device, mean, std, s.image_size,
                                     scaler, desc=f"{desc} epoch {epoch + 1}/{s.epochs}")
        val, probs = evaluate(model, val_images, val_targets, mean, std, s.image_size, s.batch_size * 2, device)
        row = {"train_loss": train_loss, "val_accuracy": val["accuracy"], "val_log_loss": val["log_loss"],
               "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": time.perf_counter() - start}
        history.append(row)
        tqdm.write(f"{desc} epoch {epoch + 1}/{s.epochs}: train_loss {train_loss:.4f}  val_accuracy "
                   f"{val['accuracy']:.4f}  val_log_loss {val['log_loss']:.4f}  ({row['epoch_seconds']:.1f} s)")
        if on_epoch is not None:
            on_epoch(epoch, row)
        if _is_better(s.monitor, val, best):
            best = val
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            result = FoldResult(state, probs, epoch)
    result.history = history
    return result


def train_backbone(data: PreparedData, model_name: str, settings: FoldSettings, out_dir: str | Path,
                   device: torch.device, tracker, pretrained: str | None = None,
                   drop_rate: float = 0.0) -> tuple[np.ndarray, dict]:
    """k-fold CV of one backbone. Writes `out_dir/fold<k>/model.pt`; returns (oof_probs, metrics).

    Each fold trains a fresh model on the other folds, normalised with its own training part's
    statistics, and fills the OOF probabilities of its validation rows.
    """
    out_dir = Path(out_dir)
    targets = data.train["target"].to_numpy()
    folds = data.train["fold"].to_numpy()
    oof = np.zeros((len(targets), len(data.classes)), dtype=np.float64)
    fold_metrics = {}
    for k in range(data.n_folds):
        tr, va = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        mean, std = data.fold_stats(k)
        torch.manual_seed(settings.seed + k)
        model = create_model(model_name, len(data.classes), pretrained=pretrained, drop_rate=drop_rate)
        fold_settings = FoldSettings(**{**settings.__dict__, "seed": settings.seed + k})
        with tracker.run(f"fold{k}", params={"fold": k, "n_train": len(tr), "n_val": len(va)}, nested=True):
            result = train_fold(
                model, np.asarray(data.train_images[tr]), targets[tr], np.asarray(data.train_images[va]),
                targets[va], mean, std, fold_settings, device,
                on_epoch=lambda epoch, row: tracker.log_metrics(row, step=epoch), desc=f"fold{k}",
            )
            oof[va] = result.val_probs
            fold_metrics[str(k)] = {**scores(result.val_probs, targets[va]), "best_epoch": result.best_epoch + 1}
            tracker.log_metrics({f"best_{m}": v for m, v in fold_metrics[str(k)].items()})
        (out_dir / f"fold{k}").mkdir(parents=True, exist_ok=True)
        torch.save({"model": model_name, "num_classes": len(data.classes), "state_dict": result.state_dict,
                    "mean": mean, "std": std, "image_size": settings.image_size, "fold": k},
                   out_dir / f"fold{k}" / "model.pt")
    per_fold = {m: [f[m] for f in fold_metrics.values()] for m in ("accuracy", "log_loss")}
    metrics = {
        "oof": scores(oof, targets),
        "fold_mean": {m: float(np.mean(v)) for m, v in per_fold.items()},
        "fold_std": {m: float(np.std(v)) for m, v in per_fold.items()},
        "folds": fold_metrics,
    }
    return oof, metrics


def resolve_settings(train, backbone, cache_image_size: int) -> FoldSettings:
    """Shared `train.*` settings with one backbone's overrides (`train.backbones.<name>.*`) on top."""
    def pick(name):
        value = getattr(backbone, name, None)
        return getattr(train, name) if value is None else value

    return FoldSettings(
        epochs=pick("epochs"), batch_size=pick("batch_size"), lr=pick("lr"), weight_decay=pick("weight_decay"),
        warmup_epochs=train.warmup_epochs, image_size=backbone.image_size or cache_image_size,
        hflip=train.hflip, translate=train.translate, monitor=train.monitor, num_workers=train.num_workers,
        seed=train.seed,
    )
