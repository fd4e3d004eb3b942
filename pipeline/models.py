"""Backbones by name: a thin wrapper over `timm.create_model` that never downloads weights."""
from __future__ import annotations

from pathlib import Path

import timm
import torch

from pipeline.errors import PipelineError


def check_backbone(name: str, key: str = "train.backbones") -> None:
    if not timm.is_model(name):
        raise PipelineError(f"{key}: unknown timm model '{name}' (see timm.list_models())")


def create_model(name: str, num_classes: int, pretrained: str | Path | None = None,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> torch.nn.Module:
    """A fresh timm model with a `num_classes` head.

    `pretrained` is a local weights file (timm checkpoint or .safetensors); timm loads it and
    replaces the classifier when the class count differs. Without it the weights are random.
    """
    check_backbone(name)
    kwargs = dict(num_classes=num_classes, drop_rate=drop_rate)
    if drop_path_rate:  # only architectures with stochastic depth accept it
        kwargs["drop_path_rate"] = drop_path_rate
    if pretrained:
        path = Path(pretrained)
        if not path.is_file():
            raise PipelineError(f"{name}: pretrained weights file '{path}' not found")
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    return timm.create_model(name, pretrained=False, **kwargs)


def pick_device() -> torch.device:
    """CUDA, then Apple MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA only: bf16 where the GPU supports it, else fp16 (needs a GradScaler)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
