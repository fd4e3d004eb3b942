"""Benchmark: bf16 autocast against fp32 on this machine, training and inference images/s.

    python bench/precision.py [--repeats 5]

For each model, input size and batch below: training steps (forward, loss, backward, SGD step) and
inference batches, fp32 and bf16 alternating in one process, medians of `--repeats` (training via
`pipeline.precision.probe_precision`, the probe `train.precision: auto` runs). Prints
`RESULT <model> bf16_vs_fp32_train <ratio>` and `RESULT <model> bf16_vs_fp32_infer <ratio>`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.models import create_model, use_channels_last
from pipeline.precision import probe_precision

CASES = [("cifar_net_s", 32, 256), ("cifar_net_l", 32, 256), ("resnet18", 64, 64), ("convnext_atto", 64, 64)]


@torch.inference_mode()
def infer_rate(model, x, dtype, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            model(x)
    return steps * len(x) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cpu = torch.device("cpu")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}"
    )
    for name, size, batch in CASES:
        model = create_model(name, 10)
        train = probe_precision(model, batch, size, cpu, steps=3, repeats=args.repeats)
        model = model.eval().to(memory_format=torch.channels_last) if use_channels_last(cpu) else model.eval()
        x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
        infer_rate(model, x, None, 2), infer_rate(model, x, torch.bfloat16, 2)  # warm-up
        fp32, bf16 = [], []
        for _ in range(args.repeats):
            fp32.append(infer_rate(model, x, None, 5))
            bf16.append(infer_rate(model, x, torch.bfloat16, 5))
        f, b = statistics.median(fp32), statistics.median(bf16)
        print(
            f"{name} {size} px batch {batch}: train {train['fp32_images_per_s']:.0f} -> "
            f"{train['bf16_images_per_s']:.0f} images/s, inference {f:.0f} -> {b:.0f} images/s"
        )
        print(f"RESULT {name} bf16_vs_fp32_train {train['bf16_images_per_s'] / train['fp32_images_per_s']:.2f}")
        print(f"RESULT {name} bf16_vs_fp32_infer {b / f:.2f}")


if __name__ == "__main__":
    main()
