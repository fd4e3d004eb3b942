"""Benchmark: the cost of test-time augmentation per view, through the predict stage's own code.

    python bench/tta_overhead.py [--model regnetx_002] [--image-size 32] [--batch-size 256]
                                 [--images 2048] [--policy five_crop] [--repeats 5]

Times `predict_views` (the function the predict stage runs) on the same uint8 images with one view
(`identity`) and with the k views of `--policy`, alternating repeats, medians. Ideal TTA costs exactly
k forward passes, so the ratio (images/s with k views x k) / (images/s without TTA) is 1.0 when the
views themselves (flips, crops, brightness on the batch tensor) cost nothing.
Last line: `RESULT tta_overhead_ratio <value>` (target >= 0.9).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from pipeline.config import DEFAULT_TTA_POLICIES
from pipeline.data import InputConfig
from pipeline.models import create_model, pick_device
from pipeline.tasks.single_label import SingleLabel
from pipeline.tta import predict_views


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="regnetx_002")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--policy", default="five_crop", choices=sorted(DEFAULT_TTA_POLICIES))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    device = pick_device()
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10).to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    images = np.random.default_rng(0).integers(0, 256, (args.images, args.image_size, args.image_size, 3), np.uint8)
    views = DEFAULT_TTA_POLICIES[args.policy]
    mean, std = [0.5] * 3, [0.25] * 3

    def rate(vs) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        cfg = InputConfig(args.image_size, tuple(mean), tuple(std))
        predict_views(model, images, cfg, args.batch_size, device, vs, SingleLabel([str(c) for c in range(10)]))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return args.images / (time.perf_counter() - start)

    rate(["identity"])  # warm-up (allocator, cudnn autotune)
    plain, tta = [], []
    for _ in range(args.repeats):
        plain.append(rate(["identity"]))
        tta.append(rate(views))
    p, t = statistics.median(plain), statistics.median(tta)
    print(
        f"device {device.type}, threads {torch.get_num_threads()}, {args.model} at {args.image_size} px, "
        f"batch {args.batch_size}, {args.images} images, {args.repeats} alternating repeats (medians)"
    )
    print(f"no TTA:            {p:9.1f} images/s  (repeats: {', '.join(f'{x:.0f}' for x in plain)})")
    print(
        f"{args.policy} ({len(views)} views): {t:9.1f} images/s  = {t * len(views):.1f} view-passes/s "
        f"(repeats: {', '.join(f'{x:.0f}' for x in tta)})"
    )
    print(f"RESULT tta_overhead_ratio {t * len(views) / p:.3f}")


if __name__ == "__main__":
    main()
