"""Benchmark: decoding a competition into the image cache, and reading the cache back.

    python bench/prepare_cache.py data/raw/cifar10.zip [--repeats 3]

Prints the wall time of `prepare` (all train and test images decoded once) for 1 worker and for
one worker per core, and the time one training epoch spends fetching images from the cache.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from pipeline.config import CompetitionConfig
from pipeline.data import ImageDataset, build_train_transform, load_prepared
from pipeline.prepare import prepare


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args()
    comp = CompetitionConfig(source=args.source)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "prepared"
        for workers in sorted({1, os.cpu_count() or 1}):
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                summary = prepare(comp, args.image_size, 5, 42, out, workers=workers)
                times.append(time.perf_counter() - start)
            n = summary["n_train"] + summary["n_test"]
            med = statistics.median(times)
            print(
                f"prepare, {workers} worker(s): median {med:.1f} s over {args.repeats} runs "
                f"({n / med:.0f} images/s, {n} images)"
            )
        data = load_prepared(out)
        images = data.train_images  # the memory map, as training reads it
        dataset = ImageDataset(
            images, data.train["target"].to_numpy(), build_train_transform(None, 0, cache_size=images.shape[1])
        )
        start = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        dt = time.perf_counter() - start
        print(f"one epoch of cached, augmented train images (1 process): {dt:.1f} s ({len(dataset) / dt:.0f} images/s)")


if __name__ == "__main__":
    main()
