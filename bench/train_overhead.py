"""Benchmark: the pipeline's training loop against a bare PyTorch loop, same model, data and steps.

    python bench/train_overhead.py [--model regnetx_002] [--image-size 32] [--batch-size 64] [--steps 30]

Both loops train the same timm model (same initial weights, same AdamW) on the same in-memory
uint8 images. The pipeline goes through its Dataset, DataLoader, per-batch normalisation,
scheduler, finiteness check and `train_one_epoch`; the bare loop feeds pre-normalised float
tensors. Repeats alternate the two and report medians. Also prints data-loading throughput
(augmented images/s from an in-memory cache with the default augmentation) for comparison with
the model's images/s. Last line: `RESULT train_overhead_ratio <pipeline images/s / bare images/s>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import TrainSettings
from pipeline.data import ImageDataset, InputConfig, build_loader, build_train_transform, to_input
from pipeline.loop import build_optimizer, train_one_epoch
from pipeline.models import create_model, pick_device
from pipeline.tasks.single_label import SingleLabel


def bare_loop(model, batches, lr):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    model.train()
    start = time.perf_counter()
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def pipeline_loop(model, images, targets, settings, image_size, device, mean, std):
    loader = build_loader(ImageDataset(images, targets), settings.batch_size, True, 0, 0, device)
    optimizer = build_optimizer(model, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    start = time.perf_counter()
    train_one_epoch(
        model,
        loader,
        optimizer,
        scheduler,
        device,
        InputConfig(image_size, tuple(mean), tuple(std)),
        task=SingleLabel([str(c) for c in range(10)]),
        where="bench",
    )
    return time.perf_counter() - start


def loading_throughput(images, augment, batch_size, device) -> float:
    dataset = ImageDataset(
        images, np.zeros(len(images), dtype=np.int64), build_train_transform(augment, 0, cache_size=images.shape[1])
    )
    loader = build_loader(dataset, batch_size, True, 0, 0, device)
    start = time.perf_counter()
    n = sum(len(x) for x, _ in loader)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="regnetx_002")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = pick_device()
    rng = np.random.default_rng(0)
    n = args.steps * args.batch_size
    images = rng.integers(0, 256, size=(n, args.image_size, args.image_size, 3), dtype=np.uint8)
    targets = rng.integers(0, 10, size=n)
    mean, std = [0.5] * 3, [0.25] * 3
    settings = dataclasses.replace(TrainSettings(), batch_size=args.batch_size, lr=1e-3, augment=[])
    x = to_input(torch.from_numpy(images), InputConfig(args.image_size, tuple(mean), tuple(std)), device)
    batches = [
        (x[i : i + args.batch_size], torch.from_numpy(targets[i : i + args.batch_size]).to(device))
        for i in range(0, n, args.batch_size)
    ]

    torch.manual_seed(0)
    initial = create_model(args.model, 10).state_dict()

    def fresh():
        model = create_model(args.model, 10)
        model.load_state_dict(initial)
        return model.to(device)

    bare_loop(fresh(), batches[:3], 1e-3)  # warm-up: allocator, kernels
    bare, pipe = [], []
    for _ in range(args.repeats):
        bare.append(n / bare_loop(fresh(), batches, 1e-3))
        pipe.append(n / pipeline_loop(fresh(), images, targets, settings, args.image_size, device, mean, std))
    bare_ips, pipe_ips = statistics.median(bare), statistics.median(pipe)
    load_ips = loading_throughput(images, TrainSettings().augment, args.batch_size, device)
    print(
        f"device {device.type}, {torch.get_num_threads()} threads, {args.model} at {args.image_size} px, "
        f"batch {args.batch_size}, {args.steps} steps, median of {args.repeats}"
    )
    print(f"bare loop:      {bare_ips:8.1f} images/s  (runs: {', '.join(f'{v:.1f}' for v in bare)})")
    print(f"pipeline loop:  {pipe_ips:8.1f} images/s  (runs: {', '.join(f'{v:.1f}' for v in pipe)})")
    print(f"data loading with the default augmentation: {load_ips:8.1f} images/s (one process)")
    print(f"RESULT train_overhead_ratio {pipe_ips / bare_ips:.3f}")


if __name__ == "__main__":
    main()
