"""Batched inference, the one place a trained model is run on images: validation during training,
the predict stage's TTA views, frozen features for `features+sklearn`, and rebuilding a fold model
from its checkpoint.

What a model's logits become is the task's (`Task.outputs`). A view is any function of a normalised
batch (B, C, H, W) and the normalisation mean/std (1, C, 1, 1) that returns a batch of the same shape;
the named TTA views live in pipeline/tta.py, so editing one reruns predict, never training or the plan.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from pipeline.data import InputConfig, resize_batch, to_input
from pipeline.errors import PipelineError
from pipeline.io import load_checkpoint
from pipeline.models import create_model, use_channels_last
from pipeline.precision import amp_dtype
from pipeline.sklearn_head import CLASSIFIER_FILE, FeaturesClassifier, feature_extractor, load_classifier
from pipeline.tasks import Task

View = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def identity(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return x


@torch.inference_mode()
def _forward_batches(
    model: torch.nn.Module,
    images: np.ndarray,
    cfg: InputConfig,
    batch_size: int,
    device: torch.device,
    views: Sequence[View],
    output: Callable[[torch.Tensor], torch.Tensor],
    desc: str | None,
) -> np.ndarray:
    """`output(model(view(x)))` for every view and image: an array (V, N, ...), batched, on `device`,
    each view taken from the cached image before it is resized to the input side, in `cfg.precision`,
    channels_last on CUDA and CPU, halving the batch on CUDA out-of-memory."""
    model.eval()
    dtype = amp_dtype(device, cfg.precision)
    channels_last = use_channels_last(device)
    mean_t = torch.as_tensor(cfg.mean, device=device, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.as_tensor(cfg.std, device=device, dtype=torch.float32).view(1, -1, 1, 1)
    out, start = [], 0
    bar = tqdm(total=len(images), desc=desc, disable=None if desc else True, leave=False, mininterval=1.0)
    while start < len(images):
        try:
            x = to_input(torch.from_numpy(np.array(images[start : start + batch_size])), cfg, device, resize=False)
            batch = []
            for view in views:  # at the cache's resolution (a crop keeps its detail), then to the input size
                v = resize_batch(view(x, mean_t, std_t), cfg.image_size, cfg.interpolation)
                if channels_last:
                    v = v.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    batch.append(output(model(v).float()).cpu().numpy())
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2  # the largest batch that fits: halve until it does
            torch.cuda.empty_cache()
            continue
        out.append(np.stack(batch))
        bar.update(len(x))
        start += len(x)
    bar.close()
    return np.concatenate(out, axis=1) if out else np.zeros((len(views), 0, 0), dtype=np.float32)


def predict_outputs(
    model: torch.nn.Module,
    images: np.ndarray,
    cfg: InputConfig,
    batch_size: int,
    device: torch.device,
    task: Task,
    views: Sequence[View] = (identity,),
    desc: str | None = None,
) -> np.ndarray:
    """The task's outputs (V, N, C) of uint8 images (N, H, W, 3) under each of `views` (`task.outputs` of the
    logits: log-probabilities for a single-label task)."""
    return _forward_batches(model, images, cfg, batch_size, device, views, task.outputs, desc)


def predict(
    model: torch.nn.Module,
    images: np.ndarray,
    cfg: InputConfig,
    batch_size: int,
    device: torch.device,
    task: Task,
    desc: str | None = None,
) -> np.ndarray:
    """Predictions (N, C) of uint8 images (N, H, W, 3) without test-time augmentation: the one view merged."""
    return task.merge(predict_outputs(model, images, cfg, batch_size, device, task, desc=desc), "mean")


def extract_features(
    model: torch.nn.Module, images: np.ndarray, cfg: InputConfig, batch_size: int, device: torch.device
) -> np.ndarray:
    """Pooled backbone features (N, D) of a model created without a head (in fp32: `cfg.precision` aside)."""
    return _forward_batches(
        model, images, dataclasses.replace(cfg, precision=None), batch_size, device, (identity,), lambda f: f, None
    )[0]


def fold_model(ckpt: dict, device: torch.device, classifier=None) -> torch.nn.Module:
    """A fold's model from its checkpoint dict (with the features+sklearn `classifier` on top, if any),
    on `device`, laid out as inference runs it."""
    model = create_model(ckpt["model"], 0 if classifier is not None else ckpt["num_classes"])  # a head: its outputs
    model.load_state_dict(ckpt["state_dict"])
    if classifier is not None:
        model = FeaturesClassifier(feature_extractor(model, ckpt.get("feature_layer")), classifier)
    model.to(device)
    return model.to(memory_format=torch.channels_last) if use_channels_last(device) else model


def load_fold_model(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """Rebuild a fold model from its checkpoint; returns (model, checkpoint metadata). Nothing in the
    fold's folder is unpickled: the weights load with weights_only=True, a features+sklearn head
    through `load_classifier`."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: fold checkpoint not found (run the train stage first)")
    ckpt = load_checkpoint(path, "train this backbone again (dvc repro -f train@<backbone>)")
    head = path.with_name(CLASSIFIER_FILE)
    if ckpt.get("sklearn_head") and not head.is_file():
        raise PipelineError(f"{head}: the features+sklearn head of {path} is missing (run the train stage again)")
    return fold_model(ckpt, device, load_classifier(head) if ckpt.get("sklearn_head") else None), ckpt


def fold_input_config(ckpt: dict, device: torch.device) -> InputConfig:
    """How a fold model is fed at inference: its checkpoint's input config, in the precision it trained
    in (fp16 only on CUDA, where it can have trained)."""
    cfg = InputConfig.from_checkpoint(ckpt)
    return dataclasses.replace(cfg, precision=None) if cfg.precision == "fp16" and device.type != "cuda" else cfg
