"""Benchmark: which parts of airbench's CIFAR-10 recipe help this pipeline's training loop?

    python bench/recipe_pilots.py data/raw/cifar10.zip [--epochs 8] [--variants base,ls02,...]

Prepares the zip at 32 px with 3 folds (as the cifar10-cpu preset does), then trains fold 0 of
cifar_net_l once per variant through `train_fold` (bf16 autocast, the same seed) and prints its
validation accuracy, log loss and wall time. Each variant changes one setting of the first ("base",
the cifar10-cpu preset's AdamW recipe on the wider net), or adds one to the best so far, so a gain
is read against the line above it; fold 0 is never one the record's choices are tested on alone:
the record's OOF covers all three folds.
"""

from __future__ import annotations

import argparse
import dataclasses

from precision_parity import SETTINGS, cifar_split, fold0  # bench/, beside this script

BASE = dataclasses.replace(SETTINGS, batch_size=256, precision="bf16")  # the old preset's AdamW recipe, wider batch
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
    data = cifar_split(args.source, args.work)
    for name in args.variants.split(","):
        s = dataclasses.replace(BASE, epochs=args.epochs, val_every=args.epochs, **VARIANTS[name])
        print(f"RESULT {args.model} {name} epochs {args.epochs} {fold0(data, args.model, s, name)}", flush=True)


if __name__ == "__main__":
    main()
