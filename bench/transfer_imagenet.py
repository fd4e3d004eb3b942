"""Recipe: the transfer-learning regimes measured with real ImageNet features (EfficientNet-Lite0).

    python -m pipeline weights tf_efficientnet_lite0
    python bench/transfer_imagenet.py data/raw/cifar10.zip [--weights weights/tf_efficientnet_lite0]
        [--work /tmp/transfer-imagenet] [--size 96] [--photos 10 50 250] [--digits 10 50 all]

The source is timm's tf_efficientnet_lite0 with Google's ImageNet weights (converted offline by
`python -m pipeline weights`); bench/transfer_regimes.py is the same study from a weak source.
Two targets, each at `--size` px (the weights want 224; 96 is what 2 cores train in the time):
- photos, the domain ImageNet knows: CIFAR-10's 32 px photos from the zip, upsampled. 100 per class
  are held out, labels kept aside; the first 10, 50 or 250 per class of the rest train.
- digits, a domain it never saw: scikit-learn's 8x8 digits as the prepare stage renders them, its
  20% test split held out; 10, 50 or all (about 144) per class of its training split train.
Each size: seven regimes through `train_backbone` with 3-fold CV and `predict_backbone`: scratch (random
weights, the folds' own mean/std), then from the ImageNet weights linear_probe, features+sklearn on
the last features and on stage 3 (112 channels at stride 16), freeze with unfreeze half-way, full,
full with layer_decay 0.7. Every regime gets the same number of updates: epochs are raised for small
sets so that each fold takes about 75 steps of 32 images (3 epochs at least), the last epoch kept.
Reported: honest OOF accuracy, held-out accuracy (the mean of the 3 fold models), wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from transfer_regimes import competition, run  # bench/, beside this script

from pipeline.config import TrainSettings
from pipeline.prepare import render_digits

MODEL = "tf_efficientnet_lite0"
STEPS = 75  # updates per fold, whatever the size
BASE = TrainSettings(batch_size=32, lr=1e-3, weight_decay=0.05, label_smoothing=0.1, seed=0)
REGIMES = {  # name -> (settings changed, from the ImageNet weights?)
    "scratch": ({"lr": 3e-3}, False),
    "linear_probe": ({"finetune": "linear_probe", "lr": 0.01}, True),
    "features+sklearn": ({"finetune": "features+sklearn"}, True),
    "features+sklearn, stage 3": ({"finetune": "features+sklearn", "feature_layer": 3}, True),
    "freeze, unfreeze half-way": ({"finetune": "freeze", "freeze_stages": -1}, True),
    "full": ({}, True),
    "full, layer_decay 0.7": ({"layer_decay": 0.7}, True),
}


def augment(target: str, size: int) -> list[dict]:
    """Photos: a random crop of 35-100% and a mirror. Digits: no mirror (a mirrored 2 is no digit)."""
    if target == "photos":
        return [{"RandomResizedCrop": {"size": [size, size], "scale": [0.35, 1.0]}}, {"HorizontalFlip": {"p": 0.5}}]
    return [{"RandomResizedCrop": {"size": [size, size], "scale": [0.7, 1.0], "ratio": [0.9, 1.1]}}]


def _sized(pool: pd.DataFrame, size: str) -> pd.DataFrame:
    return pool if size == "all" else pool.groupby("label").head(int(size))


def build(source: str, work: Path, photos: list[str], digits: list[str]) -> dict[tuple[str, str], Path]:
    """(target, per-class size) -> a Kaggle-layout competition whose test images are the held-out ones."""
    targets = {}
    with zipfile.ZipFile(source) as z:
        csv = next(m for m in z.namelist() if m.endswith("train.csv"))
        prefix = csv[: -len("train.csv")]
        labels = pd.read_csv(z.open(csv), dtype=str).sample(frac=1.0, random_state=0)
        held_out = labels.groupby("label").head(100)
        pool = labels.drop(held_out.index)
        read = lambda image_id: z.read(f"{prefix}train/{image_id}.jpg")  # noqa: E731
        for size in photos:
            targets["photos", size] = competition(read, work / f"photos-{size}", _sized(pool, size), held_out)
    raw = render_digits(work / "digits-raw")
    files = {p.stem: p for split in ("train", "test") for p in (raw / split).glob("*.png")}
    train = pd.read_csv(raw / "train.csv", dtype=str).sample(frac=1.0, random_state=0)
    held_out = pd.read_csv(raw / "solution.csv", dtype=str)
    for size in digits:
        read = lambda image_id: files[image_id].read_bytes()  # noqa: E731
        targets["digits", size] = competition(read, work / f"digits-{size}", _sized(train, size), held_out, ".png")
    return targets


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("--weights", default=f"weights/{MODEL}")
    parser.add_argument("--work", default="/tmp/transfer-imagenet")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--photos", nargs="*", default=["10", "50", "250"])
    parser.add_argument("--digits", nargs="*", default=["10", "50", "all"])
    args = parser.parse_args()
    if not Path(args.weights, "model.safetensors").exists():
        raise SystemExit(f"{args.weights}: no converted weights; run `python -m pipeline weights {MODEL}` first")
    work = Path(args.work)
    started = time.perf_counter()
    results = {"size": args.size, "targets": {}}
    for (target, size), comp in build(args.source, work, args.photos, args.digits).items():
        n_train = len(pd.read_csv(comp / "train.csv"))
        epochs = int(np.clip(math.ceil(STEPS * BASE.batch_size / (n_train * 2 // 3)), 3, 100))
        for name, (changes, transfer) in REGIMES.items():
            s = dataclasses.replace(
                BASE, epochs=epochs, val_every=epochs, warmup_epochs=epochs / 10, augment=augment(target, args.size)
            )
            s = dataclasses.replace(s, **changes)
            if s.finetune == "freeze":
                s = dataclasses.replace(s, unfreeze_epoch=epochs // 2)
            r = run(comp, work, name, s, 3, args.weights if transfer else None, MODEL, args.size)
            results["targets"].setdefault(f"{target} {size}", {})[name] = {
                k: r[k] for k in ("oof_accuracy", "held_out_accuracy", "seconds")
            }
            print(
                f"{target} {size:>3} per class ({n_train} images, {epochs} epochs) {name:<26} "
                f"OOF {r['oof_accuracy']:.4f}  held-out {r['held_out_accuracy']:.4f}  {r['seconds']:.0f} s",
                flush=True,
            )
    results["seconds"] = time.perf_counter() - started
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"all in {results['seconds'] / 60:.1f} min -> {work / 'results.json'}")


if __name__ == "__main__":
    main()
