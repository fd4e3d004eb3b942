"""Benchmark: how many DataLoader workers does a GPU need? The per-core speed of the training data path.

    python bench/data_path.py [--sizes 32,128,224,384] [--repeats 3]

For each cache size: 512 random uint8 images in memory, the default training augmentation at that
size (`default_augment`: pad and random crop) plus a horizontal flip, read, augmented and collated
into batches of 64 by one process, as one DataLoader worker does (`data_path_speed`). Prints the
median images/s over repeats and the workers a GPU training at GPU_IMAGES_PER_S needs:

    RESULT data_path <size>px <images/s per core> workers_for_3000 <n>
"""

from __future__ import annotations

import argparse
import math
import statistics

import numpy as np
import torch

from pipeline.data import GPU_IMAGES_PER_S, ImageDataset, build_train_transform, data_path_speed, default_augment


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="32,128,224,384")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one worker, one core
    rng = np.random.default_rng(0)
    for size in map(int, args.sizes.split(",")):
        images = rng.integers(0, 256, (512, size, size, 3), dtype=np.uint8)
        augment = default_augment(size) + [{"HorizontalFlip": {"p": 0.5}}]
        dataset = ImageDataset(images, np.zeros(len(images), dtype=np.int64), build_train_transform(augment, 0))
        speed = statistics.median(data_path_speed(dataset, 64) for _ in range(args.repeats))
        print(
            f"RESULT data_path {size}px {speed:.0f} workers_for_{GPU_IMAGES_PER_S} "
            f"{math.ceil(GPU_IMAGES_PER_S / speed)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
