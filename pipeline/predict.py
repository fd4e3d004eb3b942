"""`predict` stage: class probabilities of every fold model, with optional flip TTA.

    python -m pipeline predict --backbone resnet10t    # writes predictions/resnet10t/

The same policy produces both files, so they are comparable for ensembling:
  oof_probs.csv   each fold model on its own validation rows (id, then one column per class)
  test_probs.csv  the mean over fold models on the test images
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import joblib
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline.data import PreparedData, to_input
from pipeline.errors import PipelineError
from pipeline.models import amp_dtype, create_model


@torch.inference_mode()
def _forward_batches(model: torch.nn.Module, images: np.ndarray, mean, std, image_size: int, batch_size: int,
                     device: torch.device, hflip: bool, output: Callable[[torch.Tensor], torch.Tensor],
                     desc: str | None) -> np.ndarray:
    model.eval()
    dtype = amp_dtype(device)
    channels_last = device.type == "cuda"
    out, start = [], 0
    bar = tqdm(total=len(images), desc=desc, disable=None if desc else True, leave=False, mininterval=1.0)
    while start < len(images):
        try:
            x = to_input(torch.from_numpy(np.array(images[start : start + batch_size])), mean, std,
                         image_size, device, channels_last)
            views = [x, torch.flip(x, dims=[3])] if hflip else [x]
            total = 0
            for view in views:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    total = total + output(model(view).float())
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2  # the largest batch that fits: halve until it does
            torch.cuda.empty_cache()
            continue
        out.append((total / len(views)).cpu().numpy())
        bar.update(len(x))
        start += len(x)
    bar.close()
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def predict_proba(model: torch.nn.Module, images: np.ndarray, mean, std, image_size: int, batch_size: int,
                  device: torch.device, hflip: bool = False, desc: str | None = None) -> np.ndarray:
    """Softmax probabilities (N, C) for uint8 images (N, H, W, 3); with `hflip`, the mean over the
    image and its mirror. On CUDA, in mixed precision, halving the batch on out-of-memory."""
    return _forward_batches(model, images, mean, std, image_size, batch_size, device, hflip,
                            lambda logits: torch.softmax(logits, dim=1), desc)


def extract_features(model: torch.nn.Module, images: np.ndarray, mean, std, image_size: int, batch_size: int,
                     device: torch.device) -> np.ndarray:
    """Pooled backbone features (N, D) of a model created with num_classes=0."""
    return _forward_batches(model, images, mean, std, image_size, batch_size, device, False, lambda f: f, None)


class FeaturesClassifier(torch.nn.Module):
    """features+sklearn at inference: frozen backbone features -> scikit-learn `predict_proba`.

    Returns log-probabilities, so the softmax in `predict_proba` gives the classifier's probabilities
    back and TTA averages them like any other model's.
    """

    def __init__(self, backbone: torch.nn.Module, classifier):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x).float().cpu().numpy()
        probs = torch.from_numpy(self.classifier.predict_proba(features)).to(x.device)
        return probs.clamp_min(1e-12).log()


def load_fold_model(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """Rebuild a fold model from its checkpoint; returns (model, checkpoint metadata)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: fold checkpoint not found (run the train stage first)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    sklearn_head = path.with_name("classifier.joblib")
    model = create_model(ckpt["model"], num_classes=0 if sklearn_head.exists() else ckpt["num_classes"])
    model.load_state_dict(ckpt["state_dict"])
    if sklearn_head.exists():
        model = FeaturesClassifier(model, joblib.load(sklearn_head))
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, ckpt


def predict_backbone(data: PreparedData, model_dir: str | Path, hflip: bool, batch_size: int,
                     device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(oof_probs, test_probs) of one backbone's fold models under one TTA policy."""
    model_dir = Path(model_dir)
    n_classes = len(data.classes)
    oof = np.zeros((len(data.train), n_classes), dtype=np.float64)
    test = np.zeros((len(data.test), n_classes), dtype=np.float64)
    folds = data.train["fold"].to_numpy()
    for k in range(data.n_folds):
        model, ckpt = load_fold_model(model_dir / f"fold{k}" / "model.pt", device)
        val_idx = np.flatnonzero(folds == k)
        kwargs = dict(mean=ckpt["mean"], std=ckpt["std"], image_size=ckpt["image_size"],
                      batch_size=batch_size, device=device, hflip=hflip)
        oof[val_idx] = predict_proba(model, data.train_images[val_idx], desc=f"oof fold{k}", **kwargs)
        test += predict_proba(model, data.test_images, desc=f"test fold{k}", **kwargs)
    return oof, test / data.n_folds


def probs_frame(ids, probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame(probs, columns=classes)
    frame.insert(0, "id", list(ids))
    return frame


def read_probs(path: str | Path, ids, classes: list[str], backbone: str) -> np.ndarray:
    """Probabilities from `path`, checked against the expected ids (same order) and classes."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{backbone}: {path} not found (run `dvc repro`)")
    frame = pd.read_csv(path, dtype={"id": str}, keep_default_na=False)
    if list(frame.columns[1:]) != [str(c) for c in classes]:
        raise PipelineError(f"{backbone}: {path} columns do not match the classes in classes.json")
    got, expected = frame["id"].tolist(), [str(i) for i in ids]
    if got != expected:
        row = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        found = f"id '{got[row]}'" if row < len(got) else "no row"
        want = f"'{expected[row]}'" if row < len(expected) else "no row"
        raise PipelineError(f"{backbone}: {path} row {row + 2}: {found} where the prepared data has {want} "
                            f"({len(got)} rows, {len(expected)} expected)")
    try:
        probs = frame.iloc[:, 1:].to_numpy(dtype=np.float64)
    except ValueError:
        raise PipelineError(f"{backbone}: {path} has a value that is not a number") from None
    bad = np.flatnonzero(~np.isclose(probs.sum(1), 1.0, atol=1e-4) | (probs < 0).any(1))
    if len(bad):
        raise PipelineError(f"{backbone}: {path} row {bad[0] + 2}: probabilities sum to {probs[bad[0]].sum():.6g}, "
                            f"not 1 ({len(bad)} such rows)")
    return probs
