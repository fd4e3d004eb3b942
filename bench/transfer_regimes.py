"""Recipe: the transfer-learning regimes measured, from CIFAR-10's labelled training images.

    python bench/transfer_regimes.py data/raw/cifar10.zip [--work /tmp/transfer] [--sizes 25 100 400 all]

1. Source: a competition of the six animal classes (2,000 images each) trains cifar_net_s through the
   pipeline (2 folds x 10 epochs); `python -m pipeline export`'s rule picks the fold model to transfer.
2. Target: the four vehicle classes. 1,000 images per class are held out, their labels kept aside (the
   target's test set, scored as a local leaderboard); from the other 4,000 per class, the first 25,
   100, 400 or all per class are the training set.
3. For each size, six regimes through `train_fold`/`train_backbone` with 3-fold CV: scratch (random
   weights, the data's whitening stem), and from the source model linear_probe, features+sklearn,
   freeze with unfreeze_epoch, full, full with layer_decay 0.7. Reported: honest OOF accuracy,
   held-out accuracy (the fold models' mean) and wall time. Every regime shares the optimiser settings
   of the cifar10-cpu preset; epochs grow for small sets so that each fold gets about 200 steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from precision_parity import SETTINGS  # bench/, beside this script

from pipeline.backbone import Backbone
from pipeline.config import CompetitionConfig, TrainSettings
from pipeline.data import load_prepared
from pipeline.predict import predict_backbone
from pipeline.prepare import prepare
from pipeline.tracking import Tracker
from pipeline.train import train_backbone

ANIMALS = ["bird", "cat", "deer", "dog", "frog", "horse"]
VEHICLES = ["airplane", "automobile", "ship", "truck"]
CPU = torch.device("cpu")
OFF = Tracker(False, "off")
BASE = SETTINGS  # the CIFAR recipe of bench/precision_parity.py
REGIMES = {  # name -> (finetune settings, from the source model?)
    "scratch": ({"finetune": "full"}, False),
    "linear_probe": ({"finetune": "linear_probe", "lr": 0.02}, True),
    "features+sklearn": ({"finetune": "features+sklearn"}, True),
    "freeze, unfreeze half-way": ({"finetune": "freeze", "freeze_stages": -1}, True),
    "full": ({"finetune": "full"}, True),
    "full, layer_decay 0.7": ({"finetune": "full", "layer_decay": 0.7}, True),
}


def competition(read, root: Path, train: pd.DataFrame, test: pd.DataFrame, ext: str = ".jpg") -> Path:
    """A Kaggle-layout competition of these rows (ids, labels) in `root`, the test labels in solution.csv;
    `read(id)` gives an image's bytes."""
    for split, rows in (("train", train), ("test", test)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for image_id in rows["id"]:
            target = root / split / f"{image_id}{ext}"
            if not target.exists():
                target.write_bytes(read(image_id))
    train[["id", "label"]].to_csv(root / "train.csv", index=False)
    test.assign(label=test["label"].iloc[0])[["id", "label"]].to_csv(root / "sample_submission.csv", index=False)
    test[["id", "label"]].to_csv(root / "solution.csv", index=False)
    return root


def build(source: str, work: Path, sizes: list[str]) -> tuple[Path, dict[str, Path]]:
    with zipfile.ZipFile(source) as z:
        csv = next(m for m in z.namelist() if m.endswith("train.csv"))
        prefix = csv[: -len("train.csv")]
        labels = pd.read_csv(io.BytesIO(z.read(csv)), dtype=str).sample(frac=1.0, random_state=0)
        animals = labels[labels["label"].isin(ANIMALS)].groupby("label").head(2010)
        read = lambda image_id: z.read(f"{prefix}train/{image_id}.jpg")  # noqa: E731
        src = competition(read, work / "source", animals.groupby("label").head(2000), animals.groupby("label").tail(10))
        vehicles = labels[labels["label"].isin(VEHICLES)]
        held_out = vehicles.groupby("label").head(1000)
        pool = vehicles.drop(held_out.index)
        targets = {}
        for size in sizes:
            rows = pool if size == "all" else pool.groupby("label").head(int(size))
            targets[size] = competition(read, work / f"vehicles-{size}", rows, held_out)
    return src, targets


def run(
    comp: Path,
    work: Path,
    name: str,
    s: TrainSettings,
    n_folds: int,
    pretrained=None,
    model: str = "cifar_net_s",
    size: int = 32,
) -> dict:
    """k-fold CV of `model` at `size` px on `comp` through `train_backbone` (cached at `size`), then
    its fold models' mean on the test images, scored against solution.csv: OOF, held-out, seconds."""
    prepared = work / f"prepared-{comp.name}"
    if not (prepared / "classes.json").exists():
        prepare(CompetitionConfig(source=str(comp)), size, n_folds, 0, prepared, workers=0)
    data = load_prepared(prepared)
    models = work / "models" / comp.name / name.replace(" ", "_").replace(",", "").replace("+", "_")
    start = time.perf_counter()
    _, metrics = train_backbone(data, Backbone(name, model, pretrained, s, size, {}), models, CPU, OFF)
    test = predict_backbone(data, models, {"none": ["identity"]}, "mean", 256, CPU).policies["none"].test
    seconds = time.perf_counter() - start
    answers = pd.read_csv(comp / "solution.csv", dtype=str).set_index("id").loc[data.test["id"], "label"]
    held_out = float((np.asarray(data.classes)[test.argmax(1)] == answers.to_numpy()).mean())
    return {
        "oof_accuracy": metrics["oof"]["accuracy"],
        "held_out_accuracy": held_out,
        "seconds": seconds,
        "folds": metrics["folds"],
        "models": str(models),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("--work", default="/tmp/transfer")
    parser.add_argument("--sizes", nargs="+", default=["25", "100", "400", "all"])
    args = parser.parse_args()
    work = Path(args.work)
    started = time.perf_counter()
    src, targets = build(args.source, work, args.sizes)
    source = run(src, work, "source", dataclasses.replace(BASE, epochs=10, val_every=10), 2)
    folds = source["folds"]
    best = max(folds, key=lambda k: folds[k]["accuracy"])  # export's rule: the best fold by its validation score
    weights = Path(source["models"]) / "seed0" / f"fold{best}" / "model.pt"
    print(
        f"source (6 animal classes, 12,000 images): OOF {source['oof_accuracy']:.4f}, {source['seconds']:.0f} s; "
        f"transferring fold {best}"
    )
    results = {"source": source, "targets": {}}
    for size, comp in targets.items():
        n_train = len(pd.read_csv(comp / "train.csv"))
        per_fold = n_train * 2 // 3
        epochs = int(np.clip(math.ceil(200 * BASE.batch_size / per_fold), 5, 150))
        for name, (changes, transfer) in REGIMES.items():
            s = dataclasses.replace(BASE, epochs=epochs, val_every=epochs, **changes)
            if s.finetune == "freeze":
                s = dataclasses.replace(s, unfreeze_epoch=epochs // 2)
            r = run(comp, work, name, s, 3, weights if transfer else None)
            results["targets"].setdefault(size, {})[name] = {
                k: r[k] for k in ("oof_accuracy", "held_out_accuracy", "seconds")
            }
            print(
                f"{size:>4} per class ({n_train} images, {epochs} epochs) {name:<26} OOF {r['oof_accuracy']:.4f}  "
                f"held-out {r['held_out_accuracy']:.4f}  {r['seconds']:.0f} s",
                flush=True,
            )
    results["seconds"] = time.perf_counter() - started
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"all in {results['seconds'] / 60:.1f} min -> {work / 'results.json'}")


if __name__ == "__main__":
    main()
