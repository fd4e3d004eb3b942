"""Batched inference, the one place a trained model is run on images: validation during training,
the predict stage's TTA views, frozen features for `features+sklearn`, and rebuilding a fold model
from its checkpoint.

A view is any function of a normalised batch (B, C, H, W) and the normalisation mean/std
(1, C, 1, 1) that returns a batch of the same shape; the named TTA views live in the predict stage
(pipeline/predict.py), so editing one reruns predict, never training.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from pipeline.data import resize_batch, to_input
from pipeline.errors import PipelineError
from pipeline.models import amp_dtype, create_model, use_channels_last

View = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def identity(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return x


@torch.inference_mode()
def _forward_batches(model: torch.nn.Module, images: np.ndarray, mean, std, image_size: int, batch_size: int,
                     device: torch.device, views: Sequence[View], output: Callable[[torch.Tensor], torch.Tensor],
                     desc: str | None, precision: str | None = None) -> np.ndarray:
    """`output(model(view(x)))` for every view and image: an array (V, N, ...), batched, on `device`,
    each view taken from the cached image before it is resized to `image_size`,
    in mixed precision on CUDA, channels_last on CUDA and CPU, halving the batch on CUDA out-of-memory."""
    model.eval()
    dtype = amp_dtype(device, precision)
    channels_last = use_channels_last(device)
    mean_t = torch.as_tensor(mean, device=device, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, device=device, dtype=torch.float32).view(1, -1, 1, 1)
    out, start = [], 0
    bar = tqdm(total=len(images), desc=desc, disable=None if desc else True, leave=False, mininterval=1.0)
    while start < len(images):
        try:
            x = to_input(torch.from_numpy(np.array(images[start : start + batch_size])), mean, std,
                         None, device)
            batch = []
            for view in views:  # at the cache's resolution (a crop keeps its detail), then to the input size
                v = resize_batch(view(x, mean_t, std_t), image_size)
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


def predict_log_probs(model: torch.nn.Module, images: np.ndarray, mean, std, image_size: int, batch_size: int,
                      device: torch.device, views: Sequence[View] = (identity,), desc: str | None = None,
                      precision: str | None = None) -> np.ndarray:
    """Log-probabilities (V, N, C) of uint8 images (N, H, W, 3) under each of `views`, in `precision`
    (the one the model trained in; None: `amp_dtype`'s default)."""
    return _forward_batches(model, images, mean, std, image_size, batch_size, device, views,
                            lambda logits: torch.log_softmax(logits, dim=1), desc, precision)


def predict_proba(model: torch.nn.Module, images: np.ndarray, mean, std, image_size: int, batch_size: int,
                  device: torch.device, desc: str | None = None, precision: str | None = None) -> np.ndarray:
    """Softmax probabilities (N, C) of uint8 images (N, H, W, 3), no test-time augmentation."""
    return np.exp(predict_log_probs(model, images, mean, std, image_size, batch_size, device, desc=desc,
                                    precision=precision)[0])


def extract_features(model: torch.nn.Module, images: np.ndarray, mean, std, image_size: int, batch_size: int,
                     device: torch.device) -> np.ndarray:
    """Pooled backbone features (N, D) of a model created with num_classes=0."""
    return _forward_batches(model, images, mean, std, image_size, batch_size, device, (identity,),
                            lambda f: f, None)[0]


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


def fold_model(ckpt: dict, device: torch.device, classifier=None) -> torch.nn.Module:
    """A fold's model from its checkpoint dict (with the features+sklearn `classifier` on top, if any),
    on `device`, laid out as inference runs it."""
    model = create_model(ckpt["model"], num_classes=0 if classifier is not None else ckpt["num_classes"])
    model.load_state_dict(ckpt["state_dict"])
    if classifier is not None:
        model = FeaturesClassifier(model, classifier)
    model.to(device)
    return model.to(memory_format=torch.channels_last) if use_channels_last(device) else model


CLASSIFIER_FILE = "classifier.skops"  # features+sklearn: the fitted head, beside the fold's model.pt


def save_classifier(classifier, path: str | Path) -> None:
    """The features+sklearn head in skops' format: no pickle, so loading it runs no code."""
    import skops.io

    skops.io.dump(classifier, path)


def load_classifier(path: str | Path):
    """A features+sklearn head saved by `save_classifier`. Only skops' trusted types (scikit-learn's
    estimators, numpy arrays) are built: a file naming any other type is refused, never run."""
    import skops.io

    untrusted = skops.io.get_untrusted_types(file=path)
    if untrusted:
        raise PipelineError(f"{path}: refusing to load a classifier holding untrusted types {untrusted}")
    return skops.io.load(path)


def load_fold_model(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """Rebuild a fold model from its checkpoint; returns (model, checkpoint metadata). Nothing in the
    fold's folder is unpickled: the weights load with weights_only=True, a features+sklearn head
    through `load_classifier`."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: fold checkpoint not found (run the train stage first)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    head = path.with_name(CLASSIFIER_FILE)
    if ckpt.get("sklearn_head") and not head.is_file():
        raise PipelineError(f"{head}: the features+sklearn head of {path} is missing (run the train stage again)")
    return fold_model(ckpt, device, load_classifier(head) if ckpt.get("sklearn_head") else None), ckpt
