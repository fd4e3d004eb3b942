"""Benchmark: airbench94's remaining pieces, one at a time, added to the cifar10-cpu preset's training.

    python bench/airbench_pilots.py data/raw/cifar10.zip [--epochs 6] [--variants base,seed43,...]

Fold 0 of the preset's split (32 px, 3 folds, its cv.holdout; prepared once in --work, shared with
bench/airbench_peer.py), cifar_net_l trained through `train_fold` for --epochs epochs per variant and
scored on fold 0's validation rows (no TTA). `seed43` is the preset again under another seed: the spread
a piece must beat to be adopted. The pieces (airbench94.py, Keller Jordan, MIT; see airbench_peer.py):
  batch1024   batch 1,024 at 4x the lr (the same step per example), airbench's triangular schedule as a
              linear warmup over 23% of the updates then a line down to 7% of the peak
  norm_bias   batch-norm biases at 64x the lr (their decay per step kept), batch-norm weights frozen at 1
  lookahead   airbench's lookahead: from epoch 3/9.9 of the run, every 5 updates the weights move to an
              EMA of themselves (decay 0.95^5 x (progress)^3), batch-norm momentum 0.4 (its 0.6)
  alt_flip    airbench's alternating flip instead of a random one: each image mirrored or not by a coin
              drawn once, and every image mirrored on odd epochs
  dirac       every 3x3 conv's first channels initialised to the identity (an implicit residual)
Everything but the base is patched into the pipeline's functions here, for the pilot only: a piece that
gains more than the seed spread becomes a train.* option with its own test.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from airbench_peer import MODEL, PRESET, preset_params  # noqa: E402  (bench/, beside this script)

import pipeline.data  # noqa: E402
import pipeline.fold  # noqa: E402
import pipeline.loop  # noqa: E402
from pipeline.backbone import Backbone  # noqa: E402
from pipeline.config import parse_params, resolve_train_settings  # noqa: E402
from pipeline.data import load_prepared  # noqa: E402

NORMS = torch.nn.modules.batchnorm._BatchNorm


@contextlib.contextmanager
def patched(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def norm_bias_optimizer(model, s):
    """SGD with batch-norm biases at 64x the lr (decay per step kept: wd / 64), norm weights frozen."""
    for m in model.modules():
        if isinstance(m, NORMS):
            m.weight.requires_grad_(False)
    biases = {id(m.bias) for m in model.modules() if isinstance(m, NORMS)}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in biases]
    groups = [
        {
            "params": [p for p in model.parameters() if id(p) in biases],
            "lr_scale": 64.0,
            "weight_decay": s.weight_decay / 64,
        },
        {"params": [p for p in rest if p.ndim > 1], "weight_decay": s.weight_decay},
        {"params": [p for p in rest if p.ndim <= 1], "weight_decay": 0.0},
    ]
    for g in groups:
        g.setdefault("lr_scale", 1.0)
    return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum, nesterov=True)


def lookahead_optimizer(total_updates: int):
    """airbench's lookahead, wrapped around the preset's optimizer: every 5 updates from 3/9.9 of the run."""
    build = pipeline.loop.build_optimizer

    def make(model, s):
        for m in model.modules():
            if isinstance(m, NORMS):
                m.momentum = 0.4
        opt = build(model, s)
        state = {"n": 0, "ema": None}
        step = opt.step

        def stepped(*args, **kwargs):
            out = step(*args, **kwargs)
            state["n"] += 1
            n = state["n"]
            if n >= total_updates * 3 / 9.9 and n % 5 == 0:
                with torch.no_grad():
                    current = model.state_dict()
                    if state["ema"] is None:
                        state["ema"] = {k: v.clone() for k, v in current.items() if v.dtype.is_floating_point}
                    else:
                        rho = 0.95**5 * (n / total_updates) ** 3
                        for k, e in state["ema"].items():
                            e.lerp_(current[k], 1 - rho)
                            current[k].copy_(e)
            return out

        opt.step = stepped
        return opt

    return make


class AltFlipDataset(pipeline.data.ImageDataset):
    """airbench's alternating flip: a per-image coin drawn once, all images mirrored on odd epochs."""

    epoch = 0

    def __getitem__(self, i):
        if not hasattr(self, "coins"):
            self.coins = np.random.default_rng(0).random(len(self.images)) < 0.5
        img, target = super().__getitem__(i)
        return (img.flip(1) if self.coins[i] ^ (AltFlipDataset.epoch % 2 == 1) else img), target


def _reseed_tracking(seed: int, epoch: int) -> int:
    AltFlipDataset.epoch = epoch
    return RESEED(seed, epoch)


RESEED = pipeline.loop._reseed


def dirac_model(*args, **kwargs):
    model = INITIAL(*args, **kwargs)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3):
            torch.nn.init.dirac_(m.weight.data[: m.weight.size(1)])
    return model


INITIAL = pipeline.fold.initial_model


def run_variant(data, base, name: str) -> dict:
    s, stack = base, contextlib.ExitStack()
    n_train = int((data.folds != 0).sum())
    if name == "seed43":
        s = dataclasses.replace(s, seed=43)
    elif name == "batch1024":
        s = dataclasses.replace(s, batch_size=1024, lr=s.lr * 4, scheduler="linear", warmup_epochs=0.23 * s.epochs)
        s = dataclasses.replace(s, min_lr=0.07 * s.lr)
    elif name == "norm_bias":
        stack.enter_context(patched(pipeline.loop, "build_optimizer", norm_bias_optimizer))
    elif name == "lookahead":
        total = s.epochs * (n_train // s.batch_size + 1)
        stack.enter_context(patched(pipeline.loop, "build_optimizer", lookahead_optimizer(total)))
    elif name == "alt_flip":
        s = dataclasses.replace(s, augment=[a for a in s.augment if "HorizontalFlip" not in a])
        stack.enter_context(patched(pipeline.loop, "ImageDataset", AltFlipDataset))
        stack.enter_context(patched(pipeline.loop, "_reseed", _reseed_tracking))
    elif name == "dirac":
        stack.enter_context(patched(pipeline.fold, "initial_model", dirac_model))
    elif name != "base":
        raise SystemExit(f"unknown variant {name}")
    started = time.perf_counter()
    with stack:
        result, _ = pipeline.fold.train_fold(
            data, 0, Backbone(MODEL, MODEL, None, s, 32, {}), torch.device("cpu"), where=name
        )
    y = data.targets[data.folds == 0]
    return {
        **data.task.scores(result.val_probs, y, ("accuracy", "log_loss")),
        "seconds": round(time.perf_counter() - started),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--variants", default="base,seed43,batch1024,norm_bias,lookahead,alt_flip,dirac")
    parser.add_argument("--work", default="/tmp/airbench_peer")
    args = parser.parse_args()
    prepared = Path(args.work) / "prepared"
    if not (prepared / "classes.json").exists():
        raise SystemExit(f"{prepared}: run bench/airbench_peer.py {args.source} --parts equal first (it prepares)")
    data, params = load_prepared(prepared), parse_params(preset_params(), PRESET)
    base = dataclasses.replace(resolve_train_settings(params.train, MODEL), epochs=args.epochs, val_every=args.epochs)
    for name in args.variants.split(","):
        r = run_variant(data, base, name)
        print(f"RESULT pilot {name} epochs {args.epochs} accuracy {r['accuracy']:.4f} log_loss {r['log_loss']:.4f} "
              f"seconds {r['seconds']}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
