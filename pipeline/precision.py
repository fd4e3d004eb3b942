"""Which precision a run trains and predicts in: the autocast dtype of `train.precision`, and for
`auto` a measured probe of fp32 against bf16 on this machine, cached per CPU, model, input size and batch."""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from pipeline.errors import PipelineError
from pipeline.io import atomic_write_text
from pipeline.models import use_channels_last

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(device: torch.device, precision: str | None = None) -> torch.dtype | None:
    """The autocast dtype of a resolved `precision` ("fp32", "bf16", "fp16"); None = no autocast.
    Unresolved (None): mixed precision on CUDA (bf16 where the GPU supports it, else fp16, which needs
    a GradScaler), fp32 elsewhere. Weights, optimizer state and checkpoints stay fp32 in every case."""
    if precision is None:
        precision = default_precision(device)
    return AUTOCAST[precision]


def default_precision(device: torch.device) -> str:
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def probe_precision(
    model: torch.nn.Module, batch_size: int, image_size: int, device: torch.device, steps: int = 3, repeats: int = 3
) -> dict:
    """Training images/s of `model` in fp32 and under bf16 autocast on this machine: `steps` SGD steps
    on a random batch of the real shape, each way, alternating, `repeats` times (medians). The model
    is copied, so its weights do not move. On a CPU without a native bf16 path (`has_native_bf16`) bf16 is not
    timed: emulated, it ran 10x slower than fp32 (cifar_net_l on a 2-core AVX2 AMD EPYC), and its probe alone
    took minutes of the budget."""
    if not has_native_bf16(device):
        return {"fp32_images_per_s": None, "bf16_images_per_s": None, "bf16": "no native bf16 on this CPU"}
    probe = copy.deepcopy(model).to(device).train()
    if use_channels_last(device):
        probe = probe.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD([p for p in probe.parameters() if p.requires_grad], lr=1e-6)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    if use_channels_last(device):
        x = x.contiguous(memory_format=torch.channels_last)

    def run(dtype) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = probe(x)
                loss = out.float().square().mean()  # any scalar: the probe times the model's backward, not a loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return steps * batch_size / (time.perf_counter() - start)

    run(None), run(torch.bfloat16)  # warm-up: kernels chosen, caches filled
    fp32, bf16 = [], []
    for _ in range(repeats):
        fp32.append(run(None))
        bf16.append(run(torch.bfloat16))
    return {"fp32_images_per_s": statistics.median(fp32), "bf16_images_per_s": statistics.median(bf16)}


def has_native_bf16(device: torch.device) -> bool:
    """Whether bf16 has a native path here: on the CPU, oneDNN's bf16 kernels (AVX-512 or AMX; AVX2 alone
    emulates them); other devices are not asked (resolve_precision takes their default)."""
    return device.type != "cpu" or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str | None, device: torch.device, probe) -> tuple[str, dict | None]:
    """(the precision a run uses, the probe's figures if one ran). `precision`: None = `default_precision`;
    "auto" = on CUDA the default, on the CPU bf16 autocast if `probe()` measures it faster than fp32
    (by 5%, above timing noise), else fp32 (also where the probe did not time bf16: no native path);
    "fp32"/"bf16"/"fp16" as asked, fp16 on CUDA only."""
    if precision is None or (precision == "auto" and device.type == "cuda"):
        return default_precision(device), None
    if precision == "fp16" and device.type != "cuda":
        raise PipelineError("train.precision: fp16 needs a CUDA GPU (its gradient scaler); use bf16 or auto on the CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PipelineError("train.precision: this GPU has no bf16; use fp16 or auto")
    if precision != "auto":
        return precision, None
    figures = probe()
    bf16, fp32 = figures["bf16_images_per_s"], figures["fp32_images_per_s"]
    return ("bf16" if bf16 is not None and bf16 > 1.05 * fp32 else "fp32"), figures


_PROBES: dict[str, dict] = {}


def cached_probe(
    model: torch.nn.Module, model_name: str, finetune: str, batch_size: int, image_size: int, device: torch.device
) -> dict:
    """`probe_precision` of this model, input size and batch, once per machine: remembered in the
    process and in ~/.cache/kaggle-image-pipeline/precision.json (keyed by the CPU, its kernel
    limits and the torch version), so folds, stages and reruns reuse it."""
    cpu = (
        next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
            platform.processor(),
        )
        if os.path.exists("/proc/cpuinfo")
        else platform.processor()
    )
    key = "|".join(
        map(
            str,
            (
                cpu,
                torch.backends.cpu.get_cpu_capability(),
                os.environ.get("ONEDNN_MAX_CPU_ISA"),
                torch.__version__,
                device.type,
                model_name,
                finetune,
                image_size,
                batch_size,
            ),
        )
    )
    path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kaggle-image-pipeline" / "precision.json"
    if key not in _PROBES:
        stored = json.loads(path.read_text()) if path.exists() else {}
        if key not in stored:
            stored[key] = probe_precision(model, batch_size, image_size, device)
            atomic_write_text(path, json.dumps(stored, indent=1))
        _PROBES[key] = stored[key]
    return _PROBES[key]
