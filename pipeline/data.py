"""Reading the prepared competition and feeding it to a network.

Images stay uint8 (N, S, S, 3) in the memory-mapped cache and are read a batch at a time (`Rows`
gives a fold's rows without copying them); per-image augmentation (train only) runs in the
Dataset on the cache's resolution, and normalisation/resizing to the network's input size run
once per batch on the device (`to_input`).
"""

from __future__ import annotations

import inspect
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler, default_collate

from pipeline.errors import PipelineError
from pipeline.io import read_json
from pipeline.tasks import DEFAULT_TASK, Task, assign_folds, create_task


@dataclass(frozen=True)
class InputConfig:
    """What a network is fed, as timm's data config says it: the input side (None: the cache's), the
    normalisation, how a batch is resized to the input side, and the autocast precision it runs in
    (None: `precision.amp_dtype`'s default). Recorded in every fold checkpoint."""

    image_size: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    precision: str | None = None

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "InputConfig":
        return cls(
            ckpt["image_size"],
            tuple(ckpt["mean"]),
            tuple(ckpt["std"]),
            ckpt.get("interpolation", "bilinear"),
            ckpt.get("precision"),
        )

    def checkpoint_fields(self) -> dict:
        return {
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "precision": self.precision,
        }


@dataclass
class PreparedData:
    train: pd.DataFrame  # id, label, target, fold
    test: pd.DataFrame  # id
    classes: list[str]
    train_images: np.ndarray
    test_images: np.ndarray
    stats: dict
    holdout: pd.DataFrame | None = None  # cv.holdout's rows (id, label, target): in no fold, predicted as test is
    holdout_images: np.ndarray | None = None
    task_name: str = DEFAULT_TASK  # classes.json's `task`: the kind of target (pipeline/tasks)
    task_options: dict = field(default_factory=dict)  # classes.json's other keys: the task's options

    @property
    def task(self) -> Task:
        """The kind of target, which owns the labels' encoding, the loss, the metrics and the files."""
        return create_task(self.task_name, self.classes, **self.task_options)

    @property
    def n_folds(self) -> int:
        return int(self.train["fold"].max()) + 1

    @property
    def targets(self) -> np.ndarray:
        """Each training row's target as the task encodes its label (a class index for single-label, a
        multi-hot row for multi-label)."""
        return self.task.encode(self.train["label"])

    @property
    def holdout_targets(self) -> np.ndarray:
        """`cv.holdout`'s targets, encoded as `targets` are."""
        return self.task.encode(self.holdout["label"])

    @property
    def folds(self) -> np.ndarray:
        """Each training row's CV fold."""
        return self.train["fold"].to_numpy()

    def validated(self, n_trained: int) -> PreparedData:
        """The training rows as the OOF's consumers see them when only folds 0..n_trained-1 were trained
        (`cv.train_folds`): the rows those folds validate, in their order. With one trained fold, its rows'
        `fold` becomes a stratified split into parts (`INNER_PARTS`, seed 0; group-aware), so that what is
        cross-fitted over folds (the TTA choice, the ensemble, thresholds, the report's per-fold scores) is
        fitted on one part and scored on the other. The other folds' rows stay in every fold's training part;
        only their OOF predictions are missing."""
        if n_trained >= self.n_folds:
            return self
        keep = np.flatnonzero(self.folds < n_trained)
        return self.rows(keep, INNER_PARTS if n_trained == 1 else None)

    def inner(self, k: int, parts: int) -> PreparedData:
        """Fold k's training rows (the other folds') as a competition of their own, their `fold` a stratified
        split into `parts` (as `rows` splits): what a choice made before training (the plan's `finetune: auto`
        comparison) is measured on. Never fold k's own rows, on which its model is scored, nor cv.holdout's."""
        return self.rows(np.flatnonzero(self.folds != k), parts)

    def rows(self, keep: np.ndarray, parts: int | None = None) -> PreparedData:
        """The training rows `keep`, in that order; with `parts`, their `fold` a stratified split into that many
        (seed 0; group-aware, as prepare assigns folds)."""
        train = self.train.iloc[keep].reset_index(drop=True)
        if parts is not None:
            task = self.task
            groups = train["group"].to_numpy() if "group" in train else None
            stratify = task.stratify_on(task.encode(train["label"]))
            train["fold"] = assign_folds(task, stratify, parts, 0, groups)
        images = None if self.train_images is None else Rows(self.train_images, keep)
        return replace(self, train=train, train_images=images)

    def validated_as_in(self, path: str | Path) -> PreparedData:
        """`validated` for the folds whose rows an OOF file (`path`: an id column first) holds: all rows,
        or exactly those of folds 0..m-1 (else a PipelineError naming the file)."""
        if not Path(path).exists():
            raise PipelineError(f"{path}: not found (run the stage that writes it first)")
        ids = pd.read_csv(path, usecols=[0], dtype=str).iloc[:, 0]
        fold_of = dict(zip(self.train["id"], self.folds))
        unknown = [i for i in ids if i not in fold_of]
        if unknown:
            raise PipelineError(f"{path}: id {unknown[0]!r} is not a training row of the prepared data")
        m = max((fold_of[i] for i in ids), default=-1) + 1
        view = self.validated(m)
        if m == 0 or len(ids) != len(view.train) or set(ids) != set(view.train["id"]):
            raise PipelineError(
                f"{path}: its {len(ids)} rows are not the validation rows of folds 0..{max(m - 1, 0)} "
                f"({len(view.train)} rows): rerun the stage that wrote it"
            )
        return view

    def native_side(self) -> float | None:
        """The training images' median short side, in the original files' pixels (None if prepare did not
        record their sizes)."""
        if "width" not in self.train or "height" not in self.train:
            return None
        return float(np.median(np.minimum(self.train["width"].to_numpy(), self.train["height"].to_numpy())))

    def fold_stats(self, fold: int | None) -> tuple[list[float], list[float]]:
        """Normalisation statistics of fold `fold`'s training part (never its validation rows); None (a
        full-data refit): of every training row (cv.holdout's are not among them)."""
        s = self.stats if fold is None else self.stats["folds"][str(fold)]
        return s["mean"], s["std"]


INNER_PARTS = 3  # one trained fold: the parts its validation rows are cross-fitted over (the ensemble's honest
# chain cross-fits inside a cross-fit: three parts leave two inside, where two would leave one)


def load_prepared(folder: str | Path, images: bool = True) -> PreparedData:
    folder = Path(folder)
    if not (folder / "classes.json").exists():
        raise PipelineError(f"{folder}: no prepared data (run `python -m pipeline prepare` first)")
    train = pd.read_csv(folder / "train.csv", dtype={"id": str, "label": str}, keep_default_na=False)
    test = pd.read_csv(folder / "test.csv", dtype={"id": str})
    load = (lambda name: np.load(folder / name, mmap_mode="r")) if images else (lambda name: None)
    labels = read_json(folder / "classes.json")
    held = folder / "holdout.csv"
    holdout = pd.read_csv(held, dtype={"id": str, "label": str}, keep_default_na=False) if held.exists() else None
    return PreparedData(
        train=train,
        test=test,
        classes=labels["classes"],
        train_images=load("train_images.npy"),
        test_images=load("test_images.npy"),
        stats=read_json(folder / "stats.json"),
        holdout=holdout,
        holdout_images=None if holdout is None else load("holdout_images.npy"),
        task_name=labels.get("task", DEFAULT_TASK),
        task_options={k: v for k, v in labels.items() if k not in ("classes", "task")},
    )


class Rows:
    """Rows `index` of an image array (the memory-mapped cache), read only when indexed: a fold's
    images without a copy of the fold. An int or an index array reads those rows; a slice gives
    another `Rows`; `np.asarray` reads them all."""

    def __init__(self, images: np.ndarray, index):
        self.images, self.index = images, np.asarray(index)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple:
        return (len(self.index), *self.images.shape[1:])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Rows(self.images, self.index[i])
        return self.images[self.index[i]]

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.images[self.index], dtype=dtype)


def default_augment(cache_size: int) -> list[dict[str, dict]]:
    """`train.augment: null`: a random shift by up to 3/32 of the side, black-padded, at the cache's
    resolution (3 px at 32 px; pad + crop costs ~30 us an image where Affine takes ~170 us)."""
    pad = max(1, round(cache_size * 3 / 32))
    return [
        {"PadIfNeeded": {"min_height": cache_size + 2 * pad, "min_width": cache_size + 2 * pad, "border_mode": 0}},
        {"RandomCrop": {"height": cache_size, "width": cache_size}},
    ]


def _serialised(entry, where: str) -> dict:
    """One entry of `train.augment` ({TransformName: {kwargs}}; a OneOf/SomeOf/Sequential takes
    `transforms:`, a list of entries) as albumentations' own serialised form, for `A.from_dict`.
    Names and arguments are checked here, so an error names the entry; `p` defaults to the class's own
    (from_dict would take 0.5)."""
    if not isinstance(entry, dict) or len(entry) != 1:
        raise PipelineError(f"{where}: expected {{TransformName: {{kwargs}}}}, got {entry!r}")
    ((name, kwargs),) = entry.items()
    kwargs = dict(kwargs or {})
    cls = getattr(A, name, None)
    compose = isinstance(cls, type) and issubclass(cls, A.BaseCompose) and cls is not A.Compose
    if not (compose or isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
        raise PipelineError(f"{where}: '{name}' is not an albumentations transform")
    parameters = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        raise PipelineError(f"{where} {name}: unknown argument '{unknown[0]}'")
    if compose:
        inner = kwargs.get("transforms")
        if not isinstance(inner, list) or not inner:
            raise PipelineError(f"{where} {name}: needs transforms: a list of {{TransformName: {{kwargs}}}}")
        kwargs["transforms"] = [_serialised(e, f"{where}.transforms[{j}]") for j, e in enumerate(inner)]
    if "p" in parameters:
        kwargs.setdefault("p", parameters["p"].default)
    return {"__class_fullname__": name, **kwargs}


def build_train_transform(
    augment: list[dict[str, dict]] | None,
    seed: int,
    where: str = "train.augment",
    p: float = 1.0,
    cache_size: int | None = None,
    image_size: int | None = None,
) -> A.Compose:
    """Albumentations pipeline from its YAML form: a list of {TransformName: {kwargs}}, applied in order
    to a share `p` of the images (all of it or none, so size-changing pairs such as pad + crop stay paired);
    None: `default_augment(cache_size)`.

    Train only: validation and test images get no per-image transform (normalise/resize run per batch).
    Given the sizes, the list must turn a cache image into one of the cache's size or of the network's
    `image_size` (e.g. RandomResizedCrop to it): anything else would train on other crops than validation sees.
    """
    if augment is None:
        augment = default_augment(cache_size or 32)
    ops = []
    for i, entry in enumerate(augment):
        spec = _serialised(entry, f"{where}[{i}]")
        try:
            ops.append(A.from_dict({"transform": spec}))
        except (TypeError, ValueError, KeyError) as exc:
            raise PipelineError(f"{where}[{i}] {spec['__class_fullname__']}: {str(exc).splitlines()[0]}") from None
    if cache_size is not None:
        out = A.Compose(ops, p=1.0)(image=np.zeros((cache_size, cache_size, 3), np.uint8))["image"].shape[:2]
        allowed = {(cache_size, cache_size), (image_size or cache_size, image_size or cache_size)}
        if out not in allowed:
            raise PipelineError(
                f"{where}: turns the {cache_size} px cache images into {out[1]}x{out[0]}; validation sees whole "
                f"images, so crop to {' or '.join(sorted({str(a[0]) for a in allowed}))} px "
                f"(the cache's size or train.image_size)"
            )
    return A.Compose(ops, p=p, seed=seed)


class ImageDataset(Dataset):
    """uint8 images (+ the task's targets: a class index, a multi-hot row), optionally augmented per item."""

    def __init__(self, images: np.ndarray, targets: np.ndarray | None = None, transform=None):
        self.images = images
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        img = np.array(self.images[i])  # a copy: a row of the memory-mapped cache is read-only
        if self.transform is not None:
            img = self.transform(image=img)["image"]
        img = torch.from_numpy(np.ascontiguousarray(img))
        if self.targets is None:
            return img
        return img, torch.as_tensor(self.targets[i])


def _seed_worker(worker_id: int) -> None:
    # each worker's augmentation stream comes from the loader's seeded generator, distinct per worker
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if transform is not None:
        transform.set_random_seed(torch.initial_seed() % 2**32)


GPU_IMAGES_PER_S = 3000  # what `num_workers: null` feeds on CUDA: a modern GPU training a small net at 224 px


def data_path_speed(dataset: Dataset, batch_size: int) -> float:
    """Images/s one process reads, augments and collates from `dataset` (two batches timed, after one)."""
    rows = np.arange(min(len(dataset), 3 * batch_size))
    default_collate([dataset[i] for i in rows[:batch_size]])
    start = time.perf_counter()
    default_collate([dataset[i] for i in rows[batch_size:]])
    return max(1, len(rows) - batch_size) / max(time.perf_counter() - start, 1e-9)


def default_num_workers(device: torch.device, dataset: Dataset | None = None, batch_size: int = 64) -> int:
    """0 on a CPU (the cache is in memory and augmentation is light: workers would steal the cores that
    compute). On a GPU: enough workers for GPU_IMAGES_PER_S at this dataset's measured per-core speed
    (its image size and augmentation), at most the cores but one; without a dataset, up to 8."""
    cores = os.cpu_count() or 1
    if device.type == "cpu":
        return 0
    if dataset is None or len(dataset) == 0:
        return min(8, cores)
    needed = math.ceil(GPU_IMAGES_PER_S / data_path_speed(dataset, batch_size))
    return max(1, min(needed, cores - 1))


def weighted_sampler(weights: np.ndarray, seed: int) -> WeightedRandomSampler:
    """Draws len(weights) rows per epoch with replacement, row i with probability proportional to
    weights[i] (`train.sampler: balanced`, with the task's `sample_weights`)."""
    return WeightedRandomSampler(
        torch.as_tensor(weights, dtype=torch.double),
        len(weights),
        replacement=True,
        generator=torch.Generator().manual_seed(seed),
    )


def build_loader(
    dataset: Dataset, batch_size: int, train: bool, num_workers: int, seed: int, device: torch.device, sampler=None
) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=train and len(dataset) > batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=generator,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
    )


def resize_batch(x: torch.Tensor, image_size: int | None, interpolation: str = "bilinear") -> torch.Tensor:
    """(B, C, H, W) -> (B, C, image_size, image_size) by `interpolation` (timm's names: bilinear, bicubic,
    nearest, area), bilinear and bicubic antialiased when they shrink; None: as it is."""
    if image_size is None or x.shape[-2:] == (image_size, image_size):
        return x
    if interpolation in ("nearest", "area"):
        return F.interpolate(x, size=(image_size, image_size), mode=interpolation)
    shrink = x.shape[-1] > image_size
    return F.interpolate(x, size=(image_size, image_size), mode=interpolation, align_corners=False, antialias=shrink)


def to_input(
    batch: torch.Tensor, cfg: InputConfig, device: torch.device, channels_last: bool = False, resize: bool = True
) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, S, S) on `device`, normalised as `cfg` says and resized to
    its input side S (`resize` False: kept at H x W, for views taken before the resize)."""
    x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.as_tensor(cfg.mean, device=device, dtype=x.dtype).view(1, -1, 1, 1)
    std_t = torch.as_tensor(cfg.std, device=device, dtype=x.dtype).view(1, -1, 1, 1)
    x = (x - mean_t) / std_t
    if resize:
        x = resize_batch(x, cfg.image_size, cfg.interpolation)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
