"""Reading the prepared competition and feeding it to a network.

Images stay uint8 (N, S, S, 3) in memory; per-image augmentation (train only) runs in the
Dataset, and normalisation/resizing run once per batch on the device (`to_input`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
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


def build_train_transform(image_size: int, hflip: bool, translate: float, seed: int) -> A.Compose:
    """Train-only augmentation on uint8 HWC images: random shift (pad + crop) and optional flip."""
    pad = int(round(translate * image_size))
    ops = []
    if pad > 0:
        ops += [
            A.PadIfNeeded(image_size + 2 * pad, image_size + 2 * pad, border_mode=cv2.BORDER_REFLECT_101),
            A.RandomCrop(image_size, image_size),
        ]
    if hflip:
        ops.append(A.HorizontalFlip(p=0.5))
    return A.Compose(ops, seed=seed)


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


def build_loader(dataset: Dataset, batch_size: int, train: bool, num_workers: int, seed: int,
                 device: torch.device) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=train, drop_last=train and len(dataset) > batch_size,
        num_workers=num_workers, pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0, generator=generator,
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
