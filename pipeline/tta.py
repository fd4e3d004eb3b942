"""Test-time augmentation: the named views (a registry, as timm registers models) and predicting images
under named views (their merge is the task's: `Task.merge`). The predict stage chooses a policy per backbone with
them; the bundle's runtime predicts with the chosen one.

A TTA policy is a list of views (`tta.policies` in params.yaml) merged per model, a view listed twice
weighing twice (airbench's policy: the plain and mirrored views 1/4 each, four shifts 1/8).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data import InputConfig
from pipeline.inference import View, identity, predict_outputs
from pipeline.tasks import Task

# ---------------------------------------------------------------- TTA views and merges

TTA_VIEWS: dict[str, View] = {}
CROP = 0.875  # multi-crop views keep this share of each side, resized back to the input size


def register_view(name: str):
    """Decorator: a TTA view maps a normalised batch (B, C, H, W) to a batch of the same shape.
    It also gets the normalisation mean/std (1, C, 1, 1), for views defined on raw pixels."""

    def wrap(fn):
        TTA_VIEWS[name] = fn
        return fn

    return wrap


register_view("identity")(identity)
register_view("hflip")(lambda x, mean, std: torch.flip(x, dims=[3]))
register_view("vflip")(lambda x, mean, std: torch.flip(x, dims=[2]))
register_view("rot90")(lambda x, mean, std: torch.rot90(x, 1, dims=(2, 3)))
register_view("rot180")(lambda x, mean, std: torch.rot90(x, 2, dims=(2, 3)))
register_view("rot270")(lambda x, mean, std: torch.rot90(x, 3, dims=(2, 3)))


def _crop(where: str):
    def view(x, mean, std):
        h, w = x.shape[-2:]
        ch, cw = max(1, round(h * CROP)), max(1, round(w * CROP))
        top = {"t": 0, "b": h - ch, "c": (h - ch) // 2}[where[0]]
        left = {"l": 0, "r": w - cw, "c": (w - cw) // 2}[where[1]]
        return F.interpolate(
            x[..., top : top + ch, left : left + cw], size=(h, w), mode="bilinear", align_corners=False
        )

    return view


for _name, _where in (
    ("crop_tl", "tl"),
    ("crop_tr", "tr"),
    ("crop_bl", "bl"),
    ("crop_br", "br"),
    ("crop_center", "cc"),
):
    register_view(_name)(_crop(_where))


def _shift(dy: int, dx: int, flip: bool = False):
    def view(x, mean, std):  # translate by (dy, dx) px, edges reflected: the training pad-and-crop's test twin
        h, w = x.shape[-2:]
        x = torch.flip(x, dims=[3]) if flip else x
        p = max(abs(dy), abs(dx))
        padded = F.pad(x, (p, p, p, p), mode="reflect")
        return padded[..., p - dy : p - dy + h, p - dx : p - dx + w]

    return view


for _name, _args in (
    ("shift_ul", (-1, -1)),
    ("shift_dr", (1, 1)),
    ("shift_ur", (-1, 1)),
    ("shift_dl", (1, -1)),
    ("hflip_shift_ul", (-1, -1, True)),  # the mirror image, then shifted
    ("hflip_shift_dr", (1, 1, True)),
    ("hflip_shift_ur", (-1, 1, True)),  # = the mirror of shift_ul: airbench's mirrored translations
    ("hflip_shift_dl", (1, -1, True)),
):
    register_view(_name)(_shift(*_args))


def _brightness(factor: float):
    def view(x, mean, std):  # scale raw pixel values, clipped to [0, 1], then normalise again
        return ((x * std + mean) * factor).clamp_(0, 1).sub_(mean).div_(std)

    return view


register_view("brighter")(_brightness(1.1))
register_view("darker")(_brightness(0.9))


# ---------------------------------------------------------------- views by name


def predict_views(
    model: torch.nn.Module,
    images: np.ndarray,
    cfg: InputConfig,
    batch_size: int,
    device: torch.device,
    views: list[str],
    task: Task,
    desc: str | None = None,
) -> np.ndarray:
    """The task's outputs (V, N, C) of uint8 images (N, H, W, 3) under each of the named `views` (log-
    probabilities for a single-label task); a view named twice (a policy's weight) is computed once."""
    unique = list(dict.fromkeys(views))
    out = predict_outputs(model, images, cfg, batch_size, device, task, [TTA_VIEWS[v] for v in unique], desc)
    return out[[unique.index(v) for v in views]] if len(unique) < len(views) else out


def predict_tta(
    model: torch.nn.Module,
    images: np.ndarray,
    cfg: InputConfig,
    batch_size: int,
    device: torch.device,
    views: tuple[str, ...],
    task: Task,
    merge: str = "mean",
) -> np.ndarray:
    """Predictions (N, C) of uint8 images, the named TTA `views` merged as the task merges them."""
    return task.merge(predict_views(model, images, cfg, batch_size, device, list(views), task), merge)
