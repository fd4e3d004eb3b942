"""The training loop, the one the project has: `fit` trains one model on the rows it is given,
validating every `val_every` epochs and keeping the best weights (`train_one_epoch`, `evaluate`).
Every caller reuses it: the CV driver (pipeline/train.py), tuning trials and the plan's speed probe.

Every epoch reseeds its own random streams from (seed, epoch), so a run resumed from its saved state
(pipeline/resume.py) ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from timm.data import Mixup
from timm.models import group_parameters
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from pipeline import distributed
from pipeline.config import TrainSettings
from pipeline.data import (
    ImageDataset,
    InputConfig,
    Rows,
    build_loader,
    build_train_transform,
    default_num_workers,
    to_input,
    weighted_sampler,
)
from pipeline.errors import PipelineError
from pipeline.inference import predict
from pipeline.metrics import is_better_scores
from pipeline.models import use_channels_last
from pipeline.precision import amp_dtype
from pipeline.resume import FoldResult, FoldState
from pipeline.tasks import Task


@dataclass
class Split:
    """Images (uint8 (N, S, S, 3), an array or `Rows` of the cache) and their targets (the task's encoding)."""

    images: np.ndarray | Rows
    targets: np.ndarray


# ---------------------------------------------------------------- building blocks


# train.scheduler -> timm's create_scheduler_v2 arguments (every one after linear warmup, per update)
SCHEDULES = {
    "cosine": {"sched": "cosine"},  # half a cosine from lr down to min_lr
    "linear": {"sched": "poly", "decay_rate": 1.0},  # a straight line down to min_lr
    "step": {"sched": "step"},  # lr x step_gamma every step_epochs
    "constant": {"sched": "step", "decay_rate": 1.0},
}


class LRSchedule:
    """timm's scheduler (`create_scheduler_v2`) stepped once per optimizer update: `s.warmup_epochs` of
    linear warmup from lr / (warmup updates), then `s.scheduler` over the remaining epochs; timm applies
    each group's `lr_scale` (layer-wise decay). Its state holds the update count, so a resumed fold
    continues on the same curve."""

    def __init__(self, optimizer: torch.optim.Optimizer, s: TrainSettings, updates_per_epoch: int):
        warmup = min(s.warmup_epochs, s.epochs)
        self.scheduler, _ = create_scheduler_v2(
            optimizer,
            **{"decay_epochs": s.step_epochs, "decay_rate": s.step_gamma, **SCHEDULES[s.scheduler]},
            num_epochs=max(s.epochs - warmup, 1 / updates_per_epoch),  # all warmup: one update to decay
            warmup_epochs=warmup,
            warmup_prefix=True,
            warmup_lr=s.lr / max(1.0, warmup * updates_per_epoch),
            min_lr=s.min_lr,
            step_on_epochs=False,
            updates_per_epoch=updates_per_epoch,
        )
        self.updates = 0
        self.scheduler.step_update(0)

    def step(self) -> None:
        self.updates += 1
        self.scheduler.step_update(self.updates)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "timm": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["timm"])
        self.updates = state["updates"]
        self.scheduler.step_update(self.updates)


def build_optimizer(model: torch.nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    """timm's optimizer factory (no weight decay on biases/norms; layer-wise lr decay if set: each group's
    lr_scale, which `LRSchedule` applies, as timm's schedulers do)."""
    return create_optimizer_v2(
        model, opt=s.optimizer, lr=s.lr, weight_decay=s.weight_decay, momentum=s.momentum, layer_decay=s.layer_decay
    )


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


# ---------------------------------------------------------------- one epoch


def _step(model, optimizer, scheduler, scaler, clip_grad_norm: float | None, ema) -> None:
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


def train_one_epoch(
    model,
    loader,
    optimizer,
    scheduler,
    device,
    cfg: InputConfig,
    *,
    mixup: Mixup | None = None,
    label_smoothing: float = 0.0,
    scaler: torch.amp.GradScaler | None = None,
    accum_steps: int = 1,
    clip_grad_norm: float | None = None,
    ema: ModelEmaV3 | None = None,
    class_weight: torch.Tensor | None = None,
    task: Task,
    where: str = "",
    desc: str | None = None,
    max_batches: int | None = None,
) -> float:
    """One pass over `loader` (its first `max_batches`: a fractional last epoch); returns the mean training
    loss (`task.loss` of the logits). `class_weight` (C,) weighs each example's loss by its class (by its
    soft target under mixup). Forward and loss run under `cfg.precision`'s autocast. `where` names the run
    in errors (backbone, fold, epoch): a non-finite loss stops training with it.
    """
    model.train()
    _frozen_norms_to_eval(model)
    dtype = amp_dtype(device, cfg.precision)
    channels_last = use_channels_last(device)
    total, count = 0.0, 0
    optimizer.zero_grad(set_to_none=True)
    n_batches = len(loader) if max_batches is None else min(len(loader), max_batches)
    batches = itertools.islice(loader, n_batches)
    for step, (images, targets) in enumerate(
        tqdm(batches, desc=desc, disable=None if desc else True, leave=False, mininterval=1.0, total=n_batches)
    ):
        x = to_input(images, cfg, device, channels_last)
        y = targets.to(device, non_blocking=True)
        if mixup is not None:
            x, y = mixup(x, y)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = task.loss(model(x), y, mixup is not None, label_smoothing, class_weight)
        if not torch.isfinite(loss):
            raise PipelineError(
                f"{where}, step {step + 1}: loss is {loss.item()} (lr {optimizer.param_groups[0]['lr']:.3g}); "
                f"lower train.lr or set train.clip_grad_norm"
                + (
                    f" (or train.precision: fp32: this ran under {str(dtype)[6:]} autocast)"
                    if dtype is not None
                    else ""
                )
            )
        (scaler.scale(loss / accum_steps) if scaler is not None else loss / accum_steps).backward()
        if (step + 1) % accum_steps == 0 or step + 1 == n_batches:
            _step(model, optimizer, scheduler, scaler, clip_grad_norm, ema)
        total += loss.item() * len(images)
        count += len(images)
    total, count = distributed.sum_across_ranks(total, count)
    return total / max(1, count)


def evaluate(
    model, val: Split, cfg: InputConfig, batch_size: int, device: torch.device, task: Task
) -> tuple[dict[str, float], np.ndarray]:
    """Validation scores and predictions (no augmentation); under DDP each rank predicts a share."""
    shard = slice(distributed.rank(), None, distributed.world_size())
    probs = predict(model, val.images[shard], cfg, batch_size, device, task)
    probs = distributed.gather_rows(probs, len(val.images))
    return task.scores(probs, val.targets), probs


# ---------------------------------------------------------------- a model's whole training


@dataclass
class _Run:
    """Everything one `fit` builds once and every epoch uses."""

    model: torch.nn.Module
    forward: torch.nn.Module  # the model as called: wrapped by DDP and torch.compile where asked
    optimizer: torch.optim.Optimizer
    scheduler: LRSchedule
    scaler: torch.amp.GradScaler | None
    ema: ModelEmaV3 | None
    mixup: Mixup | None
    loader: torch.utils.data.DataLoader
    sampler: object
    transform: object
    class_weight: torch.Tensor | None
    task: Task  # the kind of target: its loss, mixup targets and scores


def _sampler(dataset, targets: np.ndarray, s: TrainSettings, task: Task, where: str):
    if distributed.is_distributed():  # each rank trains on its own shard; s.batch_size is per rank
        if s.sampler == "balanced":
            raise PipelineError(
                f"{where}: train.sampler: balanced does not run under torchrun; use train.class_weight: balanced"
            )
        return DistributedSampler(dataset, shuffle=True, seed=s.seed, drop_last=True)
    return weighted_sampler(task.sample_weights(targets), s.seed) if s.sampler == "balanced" else None


def _setup(
    model: torch.nn.Module,
    train: Split,
    cfg: InputConfig,
    s: TrainSettings,
    device,
    task: Task,
    where: str,
    data_init: bool,
) -> _Run:
    task.check_settings(s, where)
    model.to(device)
    if data_init and hasattr(
        model, "init_from_data"
    ):  # data-dependent init (cifar_net_*: patch whitening), training rows only
        sample = np.asarray(train.images[np.random.default_rng(s.seed).permutation(len(train.images))[:5000]])
        model.init_from_data(to_input(torch.from_numpy(sample), cfg, device))
    if use_channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, s)  # before freezing: timm leaves frozen parameters out
    if s.finetune in ("freeze", "linear_probe"):
        freeze(model, -1 if s.finetune == "linear_probe" else s.freeze_stages)
    transform = build_train_transform(
        s.augment, s.seed, p=s.augment_p, cache_size=train.images.shape[1], image_size=cfg.image_size
    )
    dataset = ImageDataset(train.images, train.targets, transform)
    workers = default_num_workers(device, dataset, s.batch_size) if s.num_workers is None else s.num_workers
    sampler = _sampler(dataset, train.targets, s, task, where)
    class_weight = task.class_weight(train.targets, s.class_weight, device)
    loader = build_loader(dataset, s.batch_size, True, workers, s.seed, device, sampler=sampler)
    scheduler = LRSchedule(optimizer, s, math.ceil(len(loader) / s.grad_accum_steps))
    scaler = torch.amp.GradScaler("cuda") if amp_dtype(device, cfg.precision) == torch.float16 else None
    ema = ModelEmaV3(model, decay=s.ema_decay) if s.ema_decay else None
    mixup = task.mixup(s)
    forward = DistributedDataParallel(model) if distributed.is_distributed() else model
    forward = torch.compile(forward, backend=s.compile) if s.compile else forward
    return _Run(
        model, forward, optimizer, scheduler, scaler, ema, mixup, loader, sampler, transform, class_weight, task
    )


def _best_candidate(monitor: str, evaluated: list[tuple]) -> tuple:
    """(module, scores, probs) of the better of the live and the EMA weights (the live ones on a tie)."""
    best = evaluated[0]
    for entry in evaluated[1:]:
        if is_better_scores(monitor, entry[1], best[1]):
            best = entry
    return best


def epoch_batches(epochs: float, n_batches: int) -> list[int]:
    """The batches each epoch of a run of `epochs` trains, `n_batches` a whole epoch's: round(epochs x
    n_batches) in all (at least one), a fractional last epoch stopping part-way. Whole epochs: as many
    whole passes. A count fixed before training, so a resumed run trains exactly the same batches."""
    total = max(1, round(epochs * n_batches))
    return [min(n_batches, total - e * n_batches) for e in range(math.ceil(total / n_batches))]


def _epoch(
    run: _Run, epoch: int, batches: list[int], val: Split | None, cfg: InputConfig, s: TrainSettings, device, where: str
) -> tuple[dict, tuple | None]:
    """Train epoch `epoch` (its random streams from (seed, epoch)) for its `batches[epoch]` batches, validate
    if it is due (never without `val`); returns the epoch's row and (module, scores, probs) of the validated
    weights, or None."""
    started = time.perf_counter()
    epoch_seed = _reseed(s.seed, epoch)
    run.loader.generator.manual_seed(epoch_seed)
    run.transform.set_random_seed(epoch_seed + distributed.rank())
    if isinstance(run.sampler, DistributedSampler):
        run.sampler.set_epoch(epoch_seed)
    elif run.sampler is not None:
        run.sampler.generator.manual_seed(epoch_seed)
    if s.finetune == "freeze" and s.unfreeze_epoch is not None and epoch >= s.unfreeze_epoch:
        unfreeze(run.model)
    if run.mixup is not None:
        run.mixup.mixup_enabled = s.mixup_off_epoch is None or epoch < s.mixup_off_epoch
    try:
        train_loss = train_one_epoch(
            run.forward,
            run.loader,
            run.optimizer,
            run.scheduler,
            device,
            cfg,
            mixup=run.mixup,
            label_smoothing=s.label_smoothing,
            scaler=run.scaler,
            accum_steps=s.grad_accum_steps,
            clip_grad_norm=s.clip_grad_norm,
            ema=run.ema,
            class_weight=run.class_weight,
            task=run.task,
            where=f"{where}, epoch {epoch + 1}",
            desc=f"{where} epoch {epoch + 1}/{len(batches)}",
            max_batches=batches[epoch],
        )
    except torch.cuda.OutOfMemoryError:
        raise PipelineError(
            f"{where}: out of GPU memory at train.batch_size={s.batch_size}; lower it (e.g. to "
            f"{max(1, s.batch_size // 2)}) and raise train.grad_accum_steps to keep the effective batch"
        ) from None
    distributed.sync_buffers(run.model)
    done = sum(batches[: epoch + 1]) / len(run.loader)  # epochs trained so far: fractional after a part-epoch
    row = {"train_loss": train_loss, "lr": run.optimizer.param_groups[0]["lr"], "epochs_done": done}
    validation = None
    due = (epoch + 1) % s.val_every == 0 or epoch + 1 == len(batches)  # else: no validation this epoch
    if val is not None and due:
        candidates = [run.model] + ([run.ema.module] if run.ema is not None else [])
        validation = _best_candidate(
            s.monitor, [(m, *evaluate(m, val, cfg, s.batch_size * 2, device, run.task)) for m in candidates]
        )
        row.update({f"val_{m}": v for m, v in validation[1].items()})
    row["epoch_seconds"] = time.perf_counter() - started
    if validation is not None:
        row["ema_chosen"] = float(run.ema is not None and validation[0] is run.ema.module)
    return row, validation


def _epochs(n: float) -> str:
    """An epoch count as the plan wrote it: 12, 6.08 (a fractional run's last pass counts its share)."""
    return f"{round(n, 2):g}"


def _epoch_line(where: str, epoch: int, epochs: float, row: dict, monitor: str = "accuracy") -> str:
    line = f"{where} epoch {_epochs(min(epoch + 1, epochs))}/{_epochs(epochs)}: train_loss {row['train_loss']:.4f}  "
    if f"val_{monitor}" in row:
        shown = [m for m in dict.fromkeys([monitor, "accuracy", "log_loss"]) if f"val_{m}" in row]
        line += "  ".join(f"val_{m} {row[f'val_{m}']:.4f}" for m in shown)
        line += f"{' (EMA)' if row['ema_chosen'] else ''}  "
    return line + f"({row['epoch_seconds']:.1f} s)"


def fit(
    model: torch.nn.Module,
    train: Split,
    val: Split | None,
    cfg: InputConfig,
    s: TrainSettings,
    device: torch.device,
    *,
    task: Task,
    on_epoch: Callable[[int, dict], None] | None = None,
    state_path=None,
    where: str = "fold",
    data_init: bool = True,
) -> FoldResult:
    """Train `model` on `train` for `s.epochs` (fractional: `epoch_batches`), validate on `val` every
    `s.val_every` epochs, keep the best weights. Without `val` (a full-data refit): nothing is validated
    and the last weights are kept, the EMA's where `s.ema_decay` runs one.

    `data_init`: give a model with an `init_from_data` method its data-dependent initialisation first
    (not for pretrained weights, whose stem keeps what it learnt). With `state_path`, the full state
    is saved there after every epoch and, if the file exists when called, training continues from it.
    """
    run = _setup(model, train, cfg, s, device, task, where, data_init)
    state = FoldState(state_path, run.model, run.optimizer, run.scheduler, run.scaler, run.ema, s.monitor)
    batches = epoch_batches(s.epochs, len(run.loader))
    if state.resume() and distributed.is_main():
        tqdm.write(f"{where}: resuming after epoch {state.start_epoch}/{_epochs(s.epochs)}")
    for epoch in range(state.start_epoch, len(batches)):
        if s.early_stopping_patience is not None and state.stale >= s.early_stopping_patience:
            break
        row, validation = _epoch(run, epoch, batches, val, cfg, s, device, where)
        if distributed.is_main():
            tqdm.write(_epoch_line(where, epoch, s.epochs, row, s.monitor))
        state.end_epoch(epoch, row, validation)
        if on_epoch is not None:  # after the checkpoint: a callback that raises leaves a resumable state
            on_epoch(epoch, row)
    if val is None:  # nothing validated: the last weights, the EMA's where one runs
        last = run.ema.module if run.ema is not None else run.model
        weights = {k: v.detach().cpu().clone() for k, v in last.state_dict().items()}
        state.result = FoldResult(weights, np.zeros((0, task.n_outputs)), len(batches) - 1)
    state.result.history = state.history
    return state.result
