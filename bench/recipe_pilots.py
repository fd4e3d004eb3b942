"""Benchmark: which parts of airbench's CIFAR-10 recipe help this pipeline's training loop?

    python bench/recipe_pilots.py data/raw/cifar10.zip [--epochs 8] [--variants base,ls02,...]

Prepares the zip at 32 px with 3 folds (as the cifar10-cpu preset does), then trains fold 0 of
cifar_net_l once per variant through `fit_fold` (bf16 autocast, the same seed) and prints its
validation accuracy, log loss and wall time. Each variant changes one setting of the first ("base",
the cifar10-cpu preset's AdamW recipe on the wider net), or adds one to the best so far, so a gain
is read against the line above it; fold 0 is never one the record's choices are tested on alone:
the record's OOF covers all three folds.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from pipeline.config import CompetitionConfig, TrainSettings
from pipeline.data import load_prepared
from pipeline.metrics import scores
from pipeline.prepare import prepare
from pipeline.train import fit_fold

SHIFT_FLIP = [{"PadIfNeeded": {"min_height": 36, "min_width": 36, "border_mode": 0}},
              {"RandomCrop": {"height": 32, "width": 32}}, {"HorizontalFlip": {"p": 0.5}}]
BASE = TrainSettings(batch_size=256, lr=0.004, label_smoothing=0.1, warmup_epochs=0.5, seed=0, precision="bf16",
                     augment=SHIFT_FLIP)
# airbench94's Nesterov SGD (lr 11.5, momentum 0.85, wd 0.0153 per 1,024 summed losses), rescaled to this
# loop's mean loss at batch 256: lr 11.5 / (1024 (1 + 1 / 0.15)) x 256 = 0.375, decay per step unchanged
AIRBENCH_SGD = dict(optimizer="sgd", lr=0.375, momentum=0.85, weight_decay=0.00133, label_smoothing=0.2)
VARIANTS = {
    "base": {},
    "ls02": {"label_smoothing": 0.2},
    "sgd_airbench": AIRBENCH_SGD,
    "lookahead_adamw": {"optimizer": "lookahead_adamw", "label_smoothing": 0.2},
    "lookahead_sgd": {**AIRBENCH_SGD, "optimizer": "lookahead_sgd"},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--model", default="cifar_net_l")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--work", default="/tmp/parity")
    args = parser.parse_args()
    out = Path(args.work) / "prepared"
    if not (out / "classes.json").exists():
        prepare(CompetitionConfig(source=args.source, answers=None), 32, 3, 42, out, workers=0)
    data = load_prepared(out)
    y = data.train["target"].to_numpy()[data.train["fold"].to_numpy() == 0]
    for name in args.variants.split(","):
        s = dataclasses.replace(BASE, epochs=args.epochs, val_every=args.epochs, **VARIANTS[name])
        start = time.perf_counter()
        result, _ = fit_fold(data, 0, args.model, s, 32, torch.device("cpu"), where=name)
        seconds = time.perf_counter() - start
        r = scores(result.val_probs, y, ("accuracy", "log_loss"))
        print(f"RESULT {args.model} {name} epochs {args.epochs} accuracy {r['accuracy']:.4f} "
              f"log_loss {r['log_loss']:.4f} seconds {seconds:.0f}", flush=True)


if __name__ == "__main__":
    main()
