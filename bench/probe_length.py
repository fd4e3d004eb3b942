"""Benchmark: how many batches the plan's speed probe needs to predict the speed of a fold model's epochs.

    python bench/probe_length.py WORKDIR [--backbone cifar_net_l] [--lengths 20 40 80 150] [--epochs 2]
        [--repeats 2]

WORKDIR: a folder where `python -m pipeline prepare` has run (params.yaml, data/prepared/). For each repeat,
in one process as the plan stage runs: `measure_speed` (a warm-up pass, then a timed pass of L batches) for
every L in --lengths, then a fold model trained as the train stage trains it: fold 0 for --epochs whole
epochs (`train_fold`; the speed of its epochs but the last, which validates, is what the probe must predict: the
plan counts validation apart; the process is warm by then, as a train stage is after its first batches). Prints each
probe's training images/s and its ratio to the epochs' speed, and the probes' seconds. Last line:
`RESULT probe_length L1 r1 L2 r2 ...` with the median ratio of each length over the repeats.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--backbone", default=None, help="default: the first of train.backbones")
    ap.add_argument("--lengths", type=int, nargs="+", default=[20, 40, 80, 150])
    ap.add_argument("--epochs", type=int, default=2, help="at least 2")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    os.chdir(args.workdir)

    from pipeline.backbone import resolve_backbone
    from pipeline.config import load_params
    from pipeline.data import load_prepared
    from pipeline.fold import train_fold
    from pipeline.models import pick_device
    from pipeline.paths import RunPaths
    from pipeline.plan import measure_speed

    params, paths, device = load_params("params.yaml"), RunPaths(Path(".")), pick_device()
    data = load_prepared(paths.prepared)
    name = args.backbone or next(iter(params.train.backbones))
    backbone = resolve_backbone(params, name, data.train_images.shape[1], "params.yaml", paths.tuning(name))
    ratios: dict[int, list[float]] = {n: [] for n in args.lengths}
    for repeat in range(args.repeats):
        probes = {}
        for n in args.lengths:
            start = time.perf_counter()
            speed, precision, _ = measure_speed(data, backbone, device, params.predict.batch_size, n)
            probes[n] = (speed.train, time.perf_counter() - start)
        settings = dataclasses.replace(backbone.settings, epochs=args.epochs, val_every=args.epochs, seeds=None)
        result, _ = train_fold(data, 0, dataclasses.replace(backbone, settings=settings), device, where="bench fold 0")
        n_train = int((data.folds != 0).sum()) // settings.batch_size * settings.batch_size
        epochs_s = [
            row["epoch_seconds"] for row in result.history[:-1]
        ]  # the last validates: the plan counts that apart
        actual = n_train / float(np.median(epochs_s))
        print(f"repeat {repeat}: {precision}; fold 0's epochs but the last: {actual:.1f} images/s ({epochs_s})")
        for n, (probed, seconds) in probes.items():
            ratios[n].append(probed / actual)
            print(f"  probe of {n} batches: {probed:.1f} images/s, ratio {probed / actual:.3f}, took {seconds:.1f} s")
    line = " ".join(f"{n} {statistics.median(r):.3f}" for n, r in ratios.items())
    print(f"RESULT probe_length {line}")


if __name__ == "__main__":
    main()
