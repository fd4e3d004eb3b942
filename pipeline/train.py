"""`train` stage: k-fold cross-validated training of one timm backbone.

    python -m pipeline train --backbone resnet10t    # writes models/resnet10t/, reports/train/resnet10t.json

The one training loop of the project: `train_one_epoch`, `evaluate` and `train_fold` take what
they need as arguments and are reused by every caller (CV here, tuning and refits later).

A fold's state is checkpointed after every epoch (atomically), so a killed run started again with
the same command continues from the last completed epoch; every epoch reseeds its own random
streams from (seed, epoch), so the resumed run ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from timm.optim import create_optimizer_v2
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.models import group_parameters
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from pipeline import distributed
from pipeline.config import TrainSettings
from pipeline.data import (ImageDataset, PreparedData, Rows, balanced_sampler, build_loader, build_train_transform,
                           default_num_workers, to_input)
from pipeline.errors import PipelineError
from pipeline.io import StageProgress
from pipeline.metrics import METRICS, fold_summary, is_better, scores
from pipeline.models import (Pretrained, amp_dtype, create_model, pretrained_config, probe_precision, resolve_precision,
                             use_channels_last)
from pipeline.inference import CLASSIFIER_FILE, extract_features, load_classifier, predict_proba, save_classifier

@dataclass
class FoldResult:
    state_dict: dict
    val_probs: np.ndarray
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    classifier: object | None = None  # features+sklearn: the fitted scikit-learn classifier


# ---------------------------------------------------------------- building blocks


def lr_factor(kind: str, total_steps: int, warmup_steps: int, step_size: int = 1, gamma: float = 0.1
              ) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step `step`: linear warmup, then the schedule."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if kind == "onecycle":  # linear anneal to zero after the warmup peak
            return 1.0 - progress
        if kind == "step":
            return gamma ** ((step - warmup_steps) // max(1, step_size))
        return 1.0
    return factor


def build_optimizer(model: torch.nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    """timm's optimizer factory (no weight decay on biases/norms; layer-wise lr decay if set)."""
    optimizer = create_optimizer_v2(
        model, opt=s.optimizer, lr=s.lr, weight_decay=s.weight_decay, momentum=s.momentum,
        layer_decay=s.layer_decay,
    )
    for group in optimizer.param_groups:  # timm's own schedulers apply lr_scale; ours uses the group lr
        group["lr"] = s.lr * group.get("lr_scale", 1.0)
    return optimizer


def freeze(model: torch.nn.Module, stages: int) -> list[str]:
    """Freeze the stem and the first `stages` stages (-1: everything but the head). Returns frozen names."""
    groups = group_parameters(model, model.group_matcher(coarse=True))
    head = max(groups)
    frozen_groups = [g for g in sorted(groups) if g != head and (stages < 0 or g <= stages)]
    names = [n for g in frozen_groups for n in groups[g]]
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(False)
    return names


def unfreeze(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


def _frozen_norms_to_eval(model: torch.nn.Module) -> None:
    # a frozen stage keeps its batch-norm statistics too, or its outputs drift while its weights stand still
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def derive_seed(*keys: int) -> int:
    """The one way a seed is derived from others, e.g. a fold's from (seed, fold) and an epoch's from
    (fold seed, epoch): numpy's SeedSequence, so distinct keys give unrelated streams and no two
    (seed, fold) pairs of a bag share an initialisation (as `seed + fold` did: 42 + 1 = 43 + 0)."""
    return int(np.random.SeedSequence([k % 2**32 for k in keys]).generate_state(1)[0] >> 1)


def _reseed(seed: int, epoch: int) -> int:
    epoch_seed = derive_seed(seed, epoch)
    random.seed(epoch_seed)
    np.random.seed(epoch_seed)
    torch.manual_seed(epoch_seed)
    return epoch_seed


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _save_done(result: "FoldResult", ckpt: dict, path: Path) -> None:
    """A finished fold, kept for a resumed run: tensors and plain values only, so it loads with
    weights_only=True; a features+sklearn head goes beside it in skops' format."""
    if result.classifier is not None:
        save_classifier(result.classifier, path.with_name(f"{path.name}.{CLASSIFIER_FILE}"))
    _save_atomic({"state_dict": result.state_dict, "val_probs": torch.from_numpy(result.val_probs),
                  "best_epoch": result.best_epoch, "history": result.history, "checkpoint": ckpt}, path)


def _load_done(path: Path) -> tuple["FoldResult", dict]:
    done = torch.load(path, map_location="cpu", weights_only=True)
    head = path.with_name(f"{path.name}.{CLASSIFIER_FILE}")
    classifier = load_classifier(head) if done["checkpoint"].get("sklearn_head") else None
    return FoldResult(done["state_dict"], done["val_probs"].numpy(), done["best_epoch"], done["history"],
                      classifier), done["checkpoint"]


# ---------------------------------------------------------------- the loop


def train_one_epoch(model, loader, optimizer, scheduler, device, mean, std, image_size: int, *,
                    mixup: Mixup | None = None, label_smoothing: float = 0.0,
                    scaler: torch.amp.GradScaler | None = None, accum_steps: int = 1,
                    clip_grad_norm: float | None = None, ema: ModelEmaV3 | None = None,
                    class_weight: torch.Tensor | None = None, precision: str | None = None, where: str = "",
                    desc: str | None = None, max_batches: int | None = None) -> float:
    """One pass over `loader`; returns the mean training loss.

    `class_weight` (C,) weighs each example's loss by its class (by its soft target under mixup).
    `precision`: "fp32", "bf16" or "fp16" autocast around forward and loss (None: `amp_dtype`'s default).
    `where` names the run in errors (backbone, fold, epoch): a non-finite loss stops training with it.
    `max_batches`: stop after that many batches (the plan stage's speed probe).
    """
    model.train()
    _frozen_norms_to_eval(model)
    dtype = amp_dtype(device, precision)
    channels_last = use_channels_last(device)
    total, count = 0.0, 0
    optimizer.zero_grad(set_to_none=True)
    n_batches = len(loader) if max_batches is None else min(len(loader), max_batches)
    for step, (images, targets) in enumerate(
            tqdm(loader, desc=desc, disable=None if desc else True, leave=False, mininterval=1.0)):
        x = to_input(images, mean, std, image_size, device, channels_last)
        y = targets.to(device, non_blocking=True)
        if mixup is not None:
            x, y = mixup(x, y)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x)
            # class weights scale each example's loss, averaged over the batch (not over the weights, as
            # cross_entropy's `weight` does: that renormalises per batch and undoes most of the weighting)
            if mixup is not None:
                terms = -y * F.log_softmax(logits.float(), dim=-1)
                loss = (terms if class_weight is None else terms * class_weight).sum(-1).mean()
            else:
                loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing, reduction="none")
                loss = (loss if class_weight is None else loss * class_weight[y]).mean()
        if not torch.isfinite(loss):
            raise PipelineError(
                f"{where}, step {step + 1}: loss is {loss.item()} (lr {optimizer.param_groups[0]['lr']:.3g}); "
                f"lower train.lr or set train.clip_grad_norm"
                + (f" (or train.precision: fp32: this ran under {str(dtype)[6:]} autocast)" if dtype is not None else ""))
        (scaler.scale(loss / accum_steps) if scaler is not None else loss / accum_steps).backward()
        if (step + 1) % accum_steps == 0 or step + 1 == n_batches:
            if scaler is not None:
                scaler.unscale_(optimizer)
            if clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:
                ema.update(getattr(model, "module", model))
        total += loss.item() * len(images)
        count += len(images)
        if step + 1 == n_batches:
            break
    total, count = distributed.sum_across_ranks(total, count)
    return total / max(1, count)


def evaluate(model, images: np.ndarray, targets: np.ndarray, mean, std, image_size: int, batch_size: int,
             device: torch.device, precision: str | None = None) -> tuple[dict[str, float], np.ndarray]:
    """Validation scores and probabilities (no augmentation); under DDP each rank predicts a share."""
    shard = slice(distributed.rank(), None, distributed.world_size())
    probs = distributed.gather_rows(predict_proba(model, images[shard], mean, std, image_size, batch_size, device,
                                                  precision=precision), len(images))
    return scores(probs, targets, METRICS), probs


def _is_better(metric: str, new: dict, best: dict | None) -> bool:
    """Validation scores `new` better than `best` under `metric`, a tie broken by log loss."""
    if best is None:
        return True
    if new[metric] != best[metric]:
        return is_better(metric, new[metric], best[metric])
    return is_better("log_loss", new["log_loss"], best["log_loss"])


def train_fold(model: torch.nn.Module, train_images: np.ndarray, train_targets: np.ndarray,
               val_images: np.ndarray, val_targets: np.ndarray, mean, std, s: TrainSettings, image_size: int,
               device: torch.device, num_classes: int, *, on_epoch: Callable[[int, dict], None] | None = None,
               state_path: str | Path | None = None, where: str = "fold", data_init: bool = True,
               max_batches: int | None = None) -> FoldResult:
    """Train `model` on one fold's training part, validate every epoch, keep the best epoch's weights.

    `data_init`: give a model with an `init_from_data` method its data-dependent initialisation first
    (not for pretrained weights, whose stem keeps what it learnt).

    With `state_path`, the fold's full state is saved there after every epoch and, if the file exists
    when called, training continues from it. `max_batches`: each epoch stops after that many batches
    (a speed probe on the fold's real rows).
    """
    model.to(device)
    if data_init and hasattr(model, "init_from_data"):  # data-dependent init (cifar_net_*: patch whitening), training rows only
        sample = np.asarray(train_images[np.random.default_rng(s.seed).permutation(len(train_images))[:5000]])
        model.init_from_data(to_input(torch.from_numpy(sample), mean, std, image_size, device))
    if use_channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, s)  # before freezing: timm leaves frozen parameters out
    if s.finetune in ("freeze", "linear_probe"):
        freeze(model, -1 if s.finetune == "linear_probe" else s.freeze_stages)
    transform = build_train_transform(s.augment, s.seed, p=s.augment_p, cache_size=train_images.shape[1],
                                      image_size=image_size)
    dataset = ImageDataset(train_images, train_targets, transform)
    workers = default_num_workers(device, dataset, s.batch_size) if s.num_workers is None else s.num_workers
    sampler = None
    if distributed.is_distributed():  # each rank trains on its own shard; s.batch_size is per rank
        if s.sampler == "balanced":
            raise PipelineError(f"{where}: train.sampler: balanced does not run under torchrun; use "
                                f"train.class_weight: balanced")
        sampler = DistributedSampler(dataset, shuffle=True, seed=s.seed, drop_last=True)
    elif s.sampler == "balanced":
        sampler = balanced_sampler(train_targets, s.seed)
    class_weight = None
    if s.class_weight == "balanced":  # n / (C x count): every class carries the same total weight
        counts = np.maximum(np.bincount(train_targets, minlength=num_classes), 1)
        class_weight = torch.as_tensor(len(train_targets) / (num_classes * counts), dtype=torch.float32,
                                       device=device)
    loader = build_loader(dataset, s.batch_size, True, workers, s.seed, device, sampler=sampler)
    scheduler = _build_scheduler(optimizer, s, math.ceil(len(loader) / s.grad_accum_steps))
    scaler = torch.amp.GradScaler("cuda") if amp_dtype(device, s.precision) == torch.float16 else None
    ema = ModelEmaV3(model, decay=s.ema_decay) if s.ema_decay else None
    mixup = Mixup(mixup_alpha=s.mixup_alpha, cutmix_alpha=s.cutmix_alpha, label_smoothing=s.label_smoothing,
                  num_classes=num_classes) if s.mixup_alpha > 0 or s.cutmix_alpha > 0 else None
    forward = DistributedDataParallel(model) if distributed.is_distributed() else model
    forward = torch.compile(forward, backend=s.compile) if s.compile else forward

    state = _FoldState(state_path, model, optimizer, scheduler, scaler, ema, s.monitor)
    if state.resume() and distributed.is_main():
        tqdm.write(f"{where}: resuming after epoch {state.start_epoch}/{s.epochs}")
    for epoch in range(state.start_epoch, s.epochs):
        if s.early_stopping_patience is not None and state.stale >= s.early_stopping_patience:
            break
        started = time.perf_counter()
        epoch_seed = _reseed(s.seed, epoch)
        loader.generator.manual_seed(epoch_seed)
        transform.set_random_seed(epoch_seed + distributed.rank())
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch_seed)
        elif sampler is not None:
            sampler.generator.manual_seed(epoch_seed)
        if s.finetune == "freeze" and s.unfreeze_epoch is not None and epoch >= s.unfreeze_epoch:
            unfreeze(model)
        if mixup is not None:
            mixup.mixup_enabled = s.mixup_off_epoch is None or epoch < s.mixup_off_epoch
        try:
            train_loss = train_one_epoch(
                forward, loader, optimizer, scheduler, device, mean, std, image_size, mixup=mixup,
                label_smoothing=s.label_smoothing, scaler=scaler, accum_steps=s.grad_accum_steps,
                clip_grad_norm=s.clip_grad_norm, ema=ema, class_weight=class_weight, precision=s.precision,
                where=f"{where}, epoch {epoch + 1}",
                desc=f"{where} epoch {epoch + 1}/{s.epochs}", max_batches=max_batches)
        except torch.cuda.OutOfMemoryError:
            raise PipelineError(
                f"{where}: out of GPU memory at train.batch_size={s.batch_size}; lower it (e.g. to "
                f"{max(1, s.batch_size // 2)}) and raise train.grad_accum_steps to keep the effective batch") from None
        distributed.sync_buffers(model)
        row = {"train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"]}
        validation = None
        if (epoch + 1) % s.val_every == 0 or epoch + 1 == s.epochs:  # else: no validation this epoch
            candidates = [model] + ([ema.module] if ema is not None else [])
            validation = _best_candidate(s.monitor, [
                (m, *evaluate(m, val_images, val_targets, mean, std, image_size, s.batch_size * 2, device, s.precision))
                for m in candidates])
            row.update({f"val_{m}": v for m, v in validation[1].items()})
        row["epoch_seconds"] = time.perf_counter() - started
        if validation is not None:
            row["ema_chosen"] = float(ema is not None and validation[0] is ema.module)
        if distributed.is_main():
            tqdm.write(_epoch_line(where, epoch, s.epochs, row, s.monitor))
        state.end_epoch(epoch, row, validation)
        if on_epoch is not None:  # after the checkpoint: a callback that raises leaves a resumable state
            on_epoch(epoch, row)
    state.result.history = state.history
    return state.result


def _build_scheduler(optimizer, s: TrainSettings, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step schedule of `s.scheduler` after `s.warmup_epochs` of linear warmup."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(
        s.scheduler, s.epochs * steps_per_epoch, max(1, int(s.warmup_epochs * steps_per_epoch)),
        int(s.step_epochs * steps_per_epoch), s.step_gamma))


def _best_candidate(monitor: str, evaluated: list[tuple]) -> tuple:
    """(module, scores, probs) of the better of the live and the EMA weights (the live ones on a tie)."""
    best = evaluated[0]
    for entry in evaluated[1:]:
        if _is_better(monitor, entry[1], best[1]):
            best = entry
    return best


def _epoch_line(where: str, epoch: int, epochs: int, row: dict, monitor: str = "accuracy") -> str:
    line = f"{where} epoch {epoch + 1}/{epochs}: train_loss {row['train_loss']:.4f}  "
    if "val_accuracy" in row:
        shown = dict.fromkeys([monitor, "accuracy", "log_loss"])
        line += "  ".join(f"val_{m} {row[f'val_{m}']:.4f}" for m in shown)
        line += f"{' (EMA)' if row['ema_chosen'] else ''}  "
    return line + f"({row['epoch_seconds']:.1f} s)"


class _FoldState:
    """What a fold carries from one epoch to the next: the best validation so far (its scores,
    weights, probabilities and epoch), the validations since it improved, the history. Saved
    atomically after every epoch with the live training state (rank 0 only), loaded to resume."""

    def __init__(self, path, model, optimizer, scheduler, scaler, ema, monitor: str):
        self.path = Path(path) if path else None
        self.model, self.optimizer, self.scheduler, self.scaler, self.ema = model, optimizer, scheduler, scaler, ema
        self.monitor = monitor
        self.start_epoch, self.best, self.result, self.history, self.stale = 0, None, None, [], 0

    def resume(self) -> bool:
        """Load the saved state if there is one; True if training continues from it."""
        if self.path is None or not self.path.exists():
            return False
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.start_epoch, self.best, self.history, self.stale = (state["epoch"] + 1, state["best"], state["history"],
                                                                 state["stale"])
        if self.best is not None:
            best_state = state["best_state"] or {k: v.clone() for k, v in state["model"].items()}
            self.result = FoldResult(best_state, state["best_probs"].numpy(), state["best_epoch"])
        return True

    def end_epoch(self, epoch: int, row: dict, validation: tuple | None) -> None:
        """Record `row`; with `validation` (module, scores, probs), keep its weights if they beat the
        best so far, else count a validation without improvement; then save the state."""
        self.history.append(row)
        chosen = None
        if validation is not None:
            chosen, val, probs = validation
            if _is_better(self.monitor, val, self.best):
                self.best, self.stale = val, 0
                self.result = FoldResult({k: v.detach().cpu().clone() for k, v in chosen.state_dict().items()},
                                         probs, epoch)
            else:
                self.stale += 1
        self._save(epoch, live_is_best=self.result is not None and self.result.best_epoch == epoch
                   and chosen is self.model)
        distributed.barrier()

    def _save(self, epoch: int, live_is_best: bool) -> None:
        if self.path is None or not distributed.is_main():
            return
        r = self.result
        _save_atomic({
            "epoch": epoch, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
            "ema": self.ema.state_dict() if self.ema is not None else None, "best": self.best, "stale": self.stale,
            "history": self.history, "best_probs": torch.from_numpy(r.val_probs) if r else None,
            # the best weights are the live ones most epochs: store them only when they differ
            "best_state": None if r is None or live_is_best else r.state_dict,
            "best_epoch": r.best_epoch if r else None,
        }, self.path)


def fit_features_classifier(model: torch.nn.Module, train_images, train_targets, val_images, mean, std,
                            image_size: int, batch_size: int, device: torch.device, classifier: str):
    """features+sklearn: frozen backbone features -> a scikit-learn classifier. Returns (clf, val_probs)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC


    train_x = extract_features(model, train_images, mean, std, image_size, batch_size, device)
    val_x = extract_features(model, val_images, mean, std, image_size, batch_size, device)
    head = LogisticRegression(max_iter=2000) if classifier == "logistic_regression" else SVC(probability=True)
    clf = make_pipeline(StandardScaler(), head).fit(train_x, train_targets)
    return clf, clf.predict_proba(val_x)


def _fold_units(s: TrainSettings) -> int:
    """A fold's units of progress: its epochs (one fit for features+sklearn)."""
    return 1 if s.finetune == "features+sklearn" else s.epochs


def _fold_scores(result: FoldResult, targets: np.ndarray) -> dict:
    return {**scores(result.val_probs, targets), "best_epoch": result.best_epoch + 1}


def bootstrap_rows(rows: np.ndarray, seed: int, fold: int) -> np.ndarray:
    """A bootstrap resample (same size, with replacement) of a fold's training rows, fixed by (seed, fold)."""
    rng = np.random.default_rng([seed, fold])
    return np.sort(rng.choice(rows, size=len(rows), replace=True))


def initial_model(model_name: str, num_classes: int, s: TrainSettings, fold_seed: int,
                  pretrained: Pretrained = None) -> torch.nn.Module:
    """A fold's model before training, its random initialisation drawn from `fold_seed`."""
    torch.manual_seed(fold_seed)
    return create_model(model_name, num_classes, pretrained=pretrained, drop_rate=s.drop_rate,
                        drop_path_rate=s.drop_path_rate)


_PROBES: dict[str, dict] = {}


def cached_probe(model: torch.nn.Module, model_name: str, s: TrainSettings, image_size: int,
                 device: torch.device) -> dict:
    """`probe_precision` of this model, input size and batch, once per machine: remembered in the
    process and in ~/.cache/kaggle-image-pipeline/precision.json (keyed by the CPU, its kernel
    limits and the torch version), so folds, stages and reruns reuse it."""
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    key = "|".join(map(str, (cpu, torch.backends.cpu.get_cpu_capability(), os.environ.get("ONEDNN_MAX_CPU_ISA"),
                             torch.__version__, device.type, model_name, s.finetune, image_size, s.batch_size)))
    path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kaggle-image-pipeline" / "precision.json"
    if key not in _PROBES:
        stored = json.loads(path.read_text()) if path.exists() else {}
        if key not in stored:
            stored[key] = probe_precision(model, s.batch_size, image_size, device)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps(stored, indent=1))
            os.replace(tmp, path)
        _PROBES[key] = stored[key]
    return _PROBES[key]


def input_size(s: TrainSettings, model_name: str, pretrained: Pretrained, cache_size: int) -> int:
    """The network's input side: `s.image_size` if set, else the pretrained weights' own, else the cache's."""
    cfg = pretrained_config(model_name, pretrained)
    return s.image_size or (cfg or {}).get("image_size") or cache_size


def input_normalization(data: PreparedData, k: int, s: TrainSettings, model_name: str,
                        pretrained: Pretrained = None) -> tuple[list[float], list[float]]:
    """Mean and std fold k's model sees its inputs normalised with: `s.mean`/`s.std` if set, else the
    pretrained weights' own (what they learnt their features on), else the statistics of fold k's
    training part (never its validation rows)."""
    if s.mean is not None:
        return list(s.mean), list(s.std)
    cfg = pretrained_config(model_name, pretrained)
    return (cfg["mean"], cfg["std"]) if cfg else data.fold_stats(k)


def fit_fold(data: PreparedData, k: int, model_name: str, s: TrainSettings, image_size: int,
             device: torch.device, *, pretrained: Pretrained = None,
             on_epoch: Callable[[int, dict], None] | None = None, state_path: str | Path | None = None,
             where: str = "fold", max_batches: int | None = None) -> tuple[FoldResult, dict]:
    """The one fold setup, shared by CV training and tuning: a fresh model (seeded from `s.seed` and k)
    trained on the other folds' rows (a bootstrap resample of them if `s.bootstrap`), normalised as
    `input_normalization` says, validated on fold k, in the `s.finetune` mode. Returns (result, checkpoint)."""
    targets = data.train["target"].to_numpy()
    folds = data.train["fold"].to_numpy()
    n_classes = len(data.classes)
    tr, va = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
    if s.bootstrap:
        tr = bootstrap_rows(tr, s.seed, k)
    mean, std = input_normalization(data, k, s, model_name, pretrained)
    fold_seed = derive_seed(s.seed, k)
    sklearn_head = s.finetune == "features+sklearn"
    model = initial_model(model_name, 0 if sklearn_head else n_classes, s, fold_seed, pretrained)
    precision, probe = resolve_precision(s.precision, device, lambda: cached_probe(model, model_name, s, image_size,
                                                                                    device))
    s = dataclasses.replace(s, precision=precision)
    train_images, val_images = Rows(data.train_images, tr), Rows(data.train_images, va)  # read per batch
    if sklearn_head:
        clf, probs = fit_features_classifier(model, train_images, targets[tr], val_images, mean, std, image_size,
                                             s.batch_size * 2, device, s.sklearn_classifier)
        result = FoldResult(model.state_dict(), probs, 0, classifier=clf)
        if on_epoch is not None:  # one "epoch": the classifier's fit
            on_epoch(0, {f"val_{m}": v for m, v in scores(probs, targets[va], METRICS).items()})
    else:
        result = train_fold(model, train_images, targets[tr], val_images, targets[va], mean, std,
                            dataclasses.replace(s, seed=fold_seed), image_size, device, n_classes,
                            on_epoch=on_epoch, state_path=state_path, where=where, data_init=not pretrained,
                            max_batches=max_batches)
    checkpoint = {"model": model_name, "num_classes": n_classes, "state_dict": result.state_dict,
                  "mean": mean, "std": std, "image_size": image_size, "fold": k, "seed": s.seed,
                  "precision": precision, "precision_probe": probe, "sklearn_head": sklearn_head}
    return result, checkpoint


def train_backbone(data: PreparedData, backbone: str, model_name: str, s: TrainSettings, image_size: int,
                   out_dir: str | Path, device: torch.device, tracker, pretrained: Pretrained = None,
                   resume_dir: str | Path | None = None) -> tuple[np.ndarray, dict]:
    """k-fold CV of one backbone, once per seed of `s.seeds` (bagging). Writes
    `out_dir/seed<s>/fold<k>/model.pt`; returns (oof_probs, metrics), the OOF being the mean over seeds.

    `metrics` holds the bag's scores (`oof`, per fold, their mean and std) and each seed's own under
    `seeds`, so one seed can be compared with the bag.
    """
    targets = data.train["target"].to_numpy()
    folds = data.train["fold"].to_numpy()
    seeds = s.seeds or [s.seed]
    oofs, per_seed = [], {}
    progress = StageProgress(f"train@{backbone}", len(seeds) * data.n_folds * _fold_units(s), "epochs")
    for seed in seeds:
        oof, metrics = train_cv(data, backbone, model_name, dataclasses.replace(s, seed=seed), image_size,
                                Path(out_dir) / f"seed{seed}", device, tracker, pretrained,
                                Path(resume_dir) / f"seed{seed}" if resume_dir else None,
                                run_prefix=f"seed{seed}-" if len(seeds) > 1 else "", progress=progress)
        oofs.append(oof)
        per_seed[str(seed)] = metrics
    bag = np.mean(oofs, axis=0)
    per_fold = {str(k): scores(bag[folds == k], targets[folds == k]) for k in range(data.n_folds)}
    metrics = {
        "oof": scores(bag, targets),
        **fold_summary(per_fold),
        "folds": per_fold if len(seeds) > 1 else per_seed[str(seeds[0])]["folds"],
        "seeds": {seed: m["oof"] for seed, m in per_seed.items()},
        "bootstrap": s.bootstrap,
        "precision": per_seed[str(seeds[0])]["precision"], "precision_probe": per_seed[str(seeds[0])]["precision_probe"],
    }
    return bag, metrics


def train_cv(data: PreparedData, backbone: str, model_name: str, s: TrainSettings, image_size: int,
             out_dir: str | Path, device: torch.device, tracker, pretrained: Pretrained = None,
             resume_dir: str | Path | None = None, run_prefix: str = "", progress: StageProgress | None = None
             ) -> tuple[np.ndarray, dict]:
    """k-fold CV of one backbone with one seed. Writes `out_dir/fold<k>/model.pt`; returns (oof_probs, metrics).

    Each fold trains a fresh model on the other folds (a bootstrap resample of them if `s.bootstrap`),
    normalised with its own training part's statistics, and fills the OOF probabilities of its
    validation rows. With `resume_dir`, finished folds and the unfinished fold's last epoch are kept
    there and picked up by the next call.
    """
    out_dir = Path(out_dir)
    resume_dir = Path(resume_dir) if resume_dir else None
    if resume_dir is not None:
        resume_dir.mkdir(parents=True, exist_ok=True)
    targets = data.train["target"].to_numpy()
    folds = data.train["fold"].to_numpy()
    oof = np.zeros((len(targets), len(data.classes)), dtype=np.float64)
    fold_metrics = {}
    progress = progress or StageProgress(f"train@{backbone}", data.n_folds * _fold_units(s), "epochs")
    for k in range(data.n_folds):
        va = np.flatnonzero(folds == k)
        done = resume_dir / f"fold{k}.done.pt" if resume_dir else None
        seen = -1  # the fold's last epoch counted by `progress`

        def on_epoch(epoch: int, row: dict) -> None:
            nonlocal seen
            tracker.log_metrics(row, step=epoch)
            progress.skip(epoch - seen - 1)  # epochs kept from a killed run
            seen = epoch
            line = progress.step()
            if distributed.is_main():
                tqdm.write(line)

        if done is not None and done.exists():
            result, ckpt = _load_done(done)
            tqdm.write(f"{backbone} fold{k}: finished in an earlier run, kept")
        else:
            n_train = int((folds != k).sum())
            with tracker.run(f"{run_prefix}fold{k}", params={"fold": k, "seed": s.seed, "n_train": n_train,
                                                              "n_val": len(va)}, nested=True,
                             resume=resume_dir / f"fold{k}.mlflow_run_id" if resume_dir else None):
                result, ckpt = fit_fold(
                    data, k, model_name, s, image_size, device, pretrained=pretrained,
                    on_epoch=on_epoch,
                    state_path=resume_dir / f"fold{k}.state.pt" if resume_dir else None,
                    where=f"{backbone} fold {k}")
                tracker.log_metrics({f"best_{m}": v for m, v in _fold_scores(result, targets[va]).items()})
            if done is not None and distributed.is_main():
                _save_done(result, ckpt, done)
                (resume_dir / f"fold{k}.state.pt").unlink(missing_ok=True)
        progress.skip(_fold_units(s) - seen - 1)  # a fold kept whole, or stopped early
        oof[va] = result.val_probs
        fold_metrics[str(k)] = _fold_scores(result, targets[va])
        if distributed.is_main():  # under torchrun only rank 0 writes
            (out_dir / f"fold{k}").mkdir(parents=True, exist_ok=True)
            torch.save(ckpt, out_dir / f"fold{k}" / "model.pt")
            if result.classifier is not None:
                save_classifier(result.classifier, out_dir / f"fold{k}" / CLASSIFIER_FILE)
        distributed.barrier()
    metrics = {"oof": scores(oof, targets), **fold_summary(fold_metrics), "folds": fold_metrics,
               "precision": ckpt.get("precision"), "precision_probe": ckpt.get("precision_probe")}
    return oof, metrics
