"""Reading the prepared competition and feeding it to a network.

Images stay uint8 (N, S, S, 3) in memory; per-image augmentation (train only) runs in the
Dataset, and normalisation/resizing run once per batch on the device (`to_input`).
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from pipeline.errors import PipelineError
from pipeline.io import read_json


@dataclass
class PreparedData:
    train: pd.DataFrame  # id, label, target, fold
    test: pd.DataFrame  # id
    classes: list[str]
    train_images: np.ndarray
    test_images: np.ndarray
    stats: dict

    @property
    def n_folds(self) -> int:
        return int(self.train["fold"].max()) + 1

    def fold_stats(self, fold: int) -> tuple[list[float], list[float]]:
        """Normalisation statistics of fold `fold`'s training part (never its validation rows)."""
        s = self.stats["folds"][str(fold)]
        return s["mean"], s["std"]


def load_prepared(folder: str | Path = "data/prepared", images: bool = True) -> PreparedData:
    folder = Path(folder)
    if not (folder / "classes.json").exists():
        raise PipelineError(f"{folder}: no prepared data (run `python -m pipeline prepare` first)")
    train = pd.read_csv(folder / "train.csv", dtype={"id": str, "label": str})
    test = pd.read_csv(folder / "test.csv", dtype={"id": str})
    load = (lambda name: np.load(folder / name, mmap_mode="r")) if images else (lambda name: None)
    return PreparedData(
        train=train, test=test, classes=read_json(folder / "classes.json")["classes"],
        train_images=load("train_images.npy"), test_images=load("test_images.npy"),
        stats=read_json(folder / "stats.json"),
    )


def build_train_transform(augment: list[dict[str, dict]], seed: int, where: str = "train.augment",
                          p: float = 1.0) -> A.Compose:
    """Albumentations pipeline from its YAML form: a list of {TransformName: {kwargs}}, applied in order
    to a share `p` of the images (all of it or none, so size-changing pairs such as pad + crop stay paired).

    Train only: validation and test images get no per-image transform (normalise/resize run per batch).
    """
    ops = []
    for i, entry in enumerate(augment):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise PipelineError(f"{where}[{i}]: expected {{TransformName: {{kwargs}}}}, got {entry!r}")
        (name, kwargs), = entry.items()
        cls = getattr(A, name, None)
        if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
            raise PipelineError(f"{where}[{i}]: '{name}' is not an albumentations transform")
        unknown = sorted(set(kwargs or {}) - set(inspect.signature(cls.__init__).parameters))
        if unknown:
            raise PipelineError(f"{where}[{i}] {name}: unknown argument '{unknown[0]}'")
        try:
            ops.append(cls(**(kwargs or {})))
        except (TypeError, ValueError) as exc:
            raise PipelineError(f"{where}[{i}] {name}: {str(exc).splitlines()[0]}") from None
    return A.Compose(ops, p=p, seed=seed)


class ImageDataset(Dataset):
    """uint8 images (+ integer targets), optionally augmented per item."""

    def __init__(self, images: np.ndarray, targets: np.ndarray | None = None, transform=None):
        self.images = images
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        img = np.asarray(self.images[i])
        if self.transform is not None:
            img = self.transform(image=img)["image"]
        img = torch.from_numpy(np.ascontiguousarray(img))
        if self.targets is None:
            return img
        return img, int(self.targets[i])


def _seed_worker(worker_id: int) -> None:
    # each worker's augmentation stream comes from the loader's seeded generator, distinct per worker
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if transform is not None:
        transform.set_random_seed(torch.initial_seed() % 2**32)


def default_num_workers(device: torch.device) -> int:
    """0 on a CPU (the cache is in memory and augmentation is light: workers would steal the cores that
    compute), up to 8 on a GPU machine."""
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


def build_loader(dataset: Dataset, batch_size: int, train: bool, num_workers: int, seed: int,
                 device: torch.device, sampler=None) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
        drop_last=train and len(dataset) > batch_size, num_workers=num_workers,
        pin_memory=device.type == "cuda", generator=generator,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
    )


def to_input(batch: torch.Tensor, mean, std, image_size: int, device: torch.device,
             channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised float (B, 3, image_size, image_size) on `device`."""
    x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.as_tensor(mean, device=device, dtype=x.dtype).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, device=device, dtype=x.dtype).view(1, -1, 1, 1)
    x = (x - mean_t) / std_t
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
