"""Multi-process training (DistributedDataParallel) under torchrun.

    torchrun --nproc_per_node=2 -m pipeline train --backbone resnet10t

Each fold is trained by all processes together: the training set is sharded by a
DistributedSampler, gradients are averaged by DDP, the training loss and the validation
predictions are gathered across ranks, and only rank 0 writes files and MLflow runs.
NCCL on GPUs, gloo on CPUs. Without torchrun every helper here is a no-op.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist


def init_from_env() -> torch.device | None:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def sum_across_ranks(*values: float) -> list[float]:
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def sync_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (batch-norm statistics drift apart between DDP forwards),
    so that validation and the saved checkpoint describe one model."""
    if is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def gather_rows(local: np.ndarray, n: int) -> np.ndarray:
    """Reassemble rows computed as `rows[rank::world_size]` on each rank into all `n` rows."""
    if not is_distributed():
        return local
    parts = [None] * world_size()
    dist.all_gather_object(parts, local)
    out = np.empty((n,) + local.shape[1:], dtype=local.dtype)
    for r, part in enumerate(parts):
        out[r :: world_size()] = part
    return out


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()
