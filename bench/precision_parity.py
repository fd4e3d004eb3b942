"""Benchmark: does bf16 autocast train as well as fp32? One CIFAR-10 fold, same seed, both ways.

    python bench/precision_parity.py data/raw/cifar10.zip [--epochs 10] [--work /tmp/parity]

Prepares the zip at 32 px with 3 folds, then trains fold 0 of cifar_net_s with the cifar10-cpu
preset's settings twice through `train_fold`, `train.precision` fp32 and bf16, and prints each run's
validation accuracy, log loss and wall time. Differences within the spread that a change of seed
makes are parity; the seed spread is printed too (fp32, seeds 0 and 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from pipeline.backbone import Backbone
from pipeline.config import CompetitionConfig, TrainSettings
from pipeline.data import PreparedData, load_prepared
from pipeline.fold import train_fold
from pipeline.prepare import prepare

SETTINGS = TrainSettings(
    batch_size=128,
    lr=0.004,
    label_smoothing=0.1,
    warmup_epochs=0.5,
    seed=0,
    augment=[
        {"PadIfNeeded": {"min_height": 36, "min_width": 36, "border_mode": 0}},
        {"RandomCrop": {"height": 32, "width": 32}},
        {"HorizontalFlip": {"p": 0.5}},
    ],
)


def cifar_split(source: str, work: str) -> PreparedData:
    """The zip prepared at 32 px with 3 folds (the cifar10-cpu preset's split), once per `work` folder."""
    out = Path(work) / "prepared"
    if not (out / "classes.json").exists():
        prepare(CompetitionConfig(source=source, answers=None), 32, 3, 42, out, workers=0)
    return load_prepared(out)


def fold0(data: PreparedData, model: str, s: TrainSettings, label: str) -> str:
    """Train fold 0 with `s` through `train_fold`; its validation accuracy, log loss and wall time."""
    y = data.train["target"].to_numpy()[data.train["fold"].to_numpy() == 0]
    start = time.perf_counter()
    result, _ = train_fold(data, 0, Backbone(model, model, None, s, 32, {}), torch.device("cpu"), where=label)
    seconds = time.perf_counter() - start
    r = data.task.scores(result.val_probs, y, ("accuracy", "log_loss"))
    return f"accuracy {r['accuracy']:.4f} log_loss {r['log_loss']:.4f} seconds {seconds:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--work", default="/tmp/parity")
    args = parser.parse_args()
    data = cifar_split(args.source, args.work)
    for precision, seed in (("fp32", 0), ("bf16", 0), ("fp32", 1)):
        s = dataclasses.replace(SETTINGS, epochs=args.epochs, val_every=args.epochs, precision=precision, seed=seed)
        print(
            f"RESULT fold0 {precision} seed{seed} {fold0(data, 'cifar_net_s', s, f'{precision} seed {seed}')}",
            flush=True,
        )


if __name__ == "__main__":
    main()
