"""`predict` stage: class probabilities of every fold model under test-time augmentation (TTA).

    python -m pipeline predict --backbone resnet10t    # writes predictions/resnet10t/

A TTA policy is a list of views (`tta.policies` in params.yaml) merged per model, a view listed twice
weighing twice (airbench's policy: the plain and mirrored views 1/4 each, four shifts 1/8). Each view is
computed once per model and shared by every candidate policy; the same policy produces both files,
so they are comparable for ensembling:
  oof_probs.csv   each fold model on its own validation rows (mean over seeds when bagged)
  test_probs.csv  the mean over all fold x seed models on the test images
  tta.json        every candidate policy's OOF score, the chosen one, and the honest (cross-fitted) score of choosing
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError
from pipeline.data import InputConfig, PreparedData, Rows
from pipeline.errors import PipelineError
from pipeline.inference import View, identity, load_fold_model, predict_log_probs
from pipeline.metrics import METRICS, is_better, scores

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


def merge_views(log_probs: np.ndarray, how: str) -> np.ndarray:
    """Merge (V, N, C) per-view log-probabilities into (N, C) probabilities.

    mean: arithmetic mean of the probabilities. geometric: their geometric mean, renormalised.
    logits: softmax of the mean logits. The last two are the same thing (a view's log-probabilities
    are its logits minus a per-row constant, which the softmax removes); both names are accepted.
    """
    if how == "mean":
        return np.exp(log_probs).mean(0)
    if how in ("geometric", "logits"):
        z = log_probs.mean(0)
        z = np.exp(z - z.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)
    raise ValueError(f"unknown TTA merge '{how}' (mean, geometric or logits)")


# ---------------------------------------------------------------- views by name


def predict_views(
    model: torch.nn.Module,
    images: np.ndarray,
    cfg: InputConfig,
    batch_size: int,
    device: torch.device,
    views: list[str],
    desc: str | None = None,
) -> np.ndarray:
    """Log-probabilities (V, N, C) of uint8 images (N, H, W, 3) under each of the named `views`; a view
    named twice (a policy's weight) is computed once."""
    unique = list(dict.fromkeys(views))
    out = predict_log_probs(model, images, cfg, batch_size, device, [TTA_VIEWS[v] for v in unique], desc)
    return out[[unique.index(v) for v in views]] if len(unique) < len(views) else out


def predict_tta(
    model: torch.nn.Module,
    images: np.ndarray,
    cfg: InputConfig,
    batch_size: int,
    device: torch.device,
    views: tuple[str, ...],
    merge: str = "mean",
) -> np.ndarray:
    """Probabilities (N, C) of uint8 images merged over the named TTA `views`."""
    return merge_views(predict_views(model, images, cfg, batch_size, device, list(views)), merge)


def fold_input_config(ckpt: dict, device: torch.device) -> InputConfig:
    """How a fold model is fed at inference: its checkpoint's input config, in the precision it trained
    in (fp16 only on CUDA, where it can have trained)."""
    cfg = InputConfig.from_checkpoint(ckpt)
    return dataclasses.replace(cfg, precision=None) if cfg.precision == "fp16" and device.type != "cuda" else cfg


def list_models(model_dir: str | Path, n_folds: int) -> dict[int, list[Path]]:
    """fold -> its checkpoints, one per bagging seed: `model_dir/seed<s>/fold<k>/model.pt`."""
    model_dir = Path(model_dir)
    seeds = sorted(model_dir.glob("seed*"), key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else -1)
    if not seeds:
        raise PipelineError(f"{model_dir}: no seed<s>/ folders of fold models (run the train stage first)")
    return {k: [d / f"fold{k}" / "model.pt" for d in seeds] for k in range(n_folds)}


@dataclass
class PolicyPredictions:
    oof: np.ndarray  # (N, C): each row by its own fold's models, mean over seeds
    oof_per_seed: np.ndarray  # (S, N, C)
    test: np.ndarray  # (M, C): mean over all fold x seed models
    seeds: list[str]  # the bagging seeds, in the order of oof_per_seed
    holdout: np.ndarray | None = None  # (H, C): cv.holdout's rows as the test set is predicted


def predict_backbone(
    data: PreparedData,
    model_dir: str | Path,
    policies: dict[str, list[str]],
    merge: str,
    batch_size: int,
    device: torch.device,
) -> dict[str, PolicyPredictions]:
    """OOF and test (and `cv.holdout`) probabilities of one backbone's fold (x seed) models under each
    TTA policy.

    Every view any policy uses is computed once per model; each policy merges its own views per
    model, and models are then averaged (seeds per OOF row, folds x seeds for test and holdout).
    """
    models = list_models(model_dir, data.n_folds)
    n_seeds = len(models[0])
    views = list(dict.fromkeys(v for vs in policies.values() for v in vs))
    index = {v: i for i, v in enumerate(views)}
    n, c = len(data.train), len(data.classes)
    oof = {p: np.zeros((n_seeds, n, c)) for p in policies}
    others = {"test": data.test_images, **({} if data.holdout is None else {"holdout": data.holdout_images})}
    bag = {part: {p: np.zeros((len(images), c)) for p in policies} for part, images in others.items()}
    folds = data.folds
    for k, paths in models.items():
        val_idx = np.flatnonzero(folds == k)
        for s, path in enumerate(paths):
            model, ckpt = load_fold_model(path, device)
            cfg = fold_input_config(ckpt, device)
            kwargs = dict(cfg=cfg, batch_size=batch_size, device=device, views=views)
            val = predict_views(
                model, Rows(data.train_images, val_idx), desc=f"oof fold{k} {path.parent.parent.name}", **kwargs
            )
            for part, images in others.items():
                out = predict_views(model, images, desc=f"{part} fold{k} {path.parent.parent.name}", **kwargs)
                for p, vs in policies.items():
                    bag[part][p] += merge_views(out[[index[v] for v in vs]], merge)
            for p, vs in policies.items():
                oof[p][s, val_idx] = merge_views(val[[index[v] for v in vs]], merge)
    seeds, m = [path.parent.parent.name[4:] for path in models[0]], data.n_folds * n_seeds
    held = bag.get("holdout", dict.fromkeys(policies))
    return {
        p: PolicyPredictions(
            oof[p].mean(0), oof[p], bag["test"][p] / m, seeds, None if held[p] is None else held[p] / m
        )
        for p in policies
    }


def resolve_tta(tta, backbone: str, where: str) -> tuple[list[str], list[str]]:
    """The policies to choose from for one backbone, and the policies to compute: those plus `none`,
    so the no-TTA score is always reported. Every view must be registered here (the rest of the
    `tta` section was checked when params were read)."""
    for name, views in tta.policies.items():
        bad = [v for v in views if v not in TTA_VIEWS]
        if bad:
            raise ConfigError(f"{where}.policies.{name}: unknown view '{bad[0]}' (known: {', '.join(TTA_VIEWS)})")
    select = tta.backbones.get(backbone, tta.select)
    pool = (tta.candidates or list(tta.policies)) if select == "auto" else [select]
    return pool, list(dict.fromkeys((["none"] if "none" in tta.policies else []) + pool))


def tta_views(tta, backbone: str, where: str) -> int:
    """How many distinct views the predict stage of `backbone` computes per image."""
    _, computed = resolve_tta(tta, backbone, where)
    return len({v for policy in computed for v in tta.policies[policy]})


def select_policy(oof: dict[str, np.ndarray], y: np.ndarray, folds: np.ndarray, metric: str) -> tuple[str, np.ndarray]:
    """The policy with the best OOF `metric`, and the honest OOF of choosing that way: each fold's
    rows take the policy that scores best on the other folds' rows (cross-fitted selection)."""
    score = METRICS[metric][0]

    def best(rows) -> str:
        chosen = None
        for p, probs in oof.items():
            s = score(probs[rows], y[rows])
            if chosen is None or is_better(metric, s, chosen[1]):
                chosen = (p, s)
        return chosen[0]

    honest = np.zeros_like(next(iter(oof.values())))
    for k in np.unique(folds):
        held = folds == k
        honest[held] = oof[best(~held)][held]
    return best(np.ones(len(y), dtype=bool)), honest


def choose_policy(
    preds: dict[str, PolicyPredictions],
    tta,
    backbone: str,
    pool: list[str],
    y: np.ndarray,
    folds: np.ndarray,
    holdout_y: np.ndarray | None = None,
) -> dict:
    """The predict stage's report: the policy chosen among `pool` on OOF `tta.metric`, its scores, the
    honest score of choosing that way, every computed policy's scores and each seed's; with `cv.holdout`
    (`holdout_y`), the scores on the held-out rows too, which choose nothing."""
    chosen, honest = select_policy({c: preds[c].oof for c in pool}, y, folds, tta.metric)
    best = preds[chosen]
    held = (
        {}
        if holdout_y is None
        else {
            "holdout": scores(best.holdout, holdout_y),
            "holdout_policies": {c: scores(p.holdout, holdout_y) for c, p in preds.items()},
        }
    )
    return {
        "policy": chosen,
        "select": tta.backbones.get(backbone, tta.select),
        "merge": tta.merge,
        "views": tta.policies[chosen],
        "oof": scores(best.oof, y),
        "oof_selection_crossfit": scores(honest, y),  # the honest score of choosing the policy on OOF
        "policies": {c: scores(p.oof, y) for c, p in preds.items()},
        "seeds": {seed: scores(o, y) for seed, o in zip(best.seeds, best.oof_per_seed)},
        **held,
    }


def log_stage(report: dict, tta, backbone: str, tracker, report_path: str) -> None:
    """The predict stage's MLflow run: the chosen policy's scores, a nested run per computed policy."""
    tags = {"stage": "predict", "backbone": backbone}
    with tracker.run(
        f"predict {backbone}",
        params={"backbone": backbone, "policy": report["policy"], "select": report["select"], "merge": tta.merge},
        tags=tags,
    ):
        tracker.log_metrics({f"oof_{k}": v for k, v in report["oof"].items()})
        tracker.log_metrics({f"oof_selection_crossfit_{k}": v for k, v in report["oof_selection_crossfit"].items()})
        tracker.log_metrics({f"holdout_{k}": v for k, v in report.get("holdout", {}).items()})
        tracker.log_artifact(report_path)
        tracker.log_candidates(
            {
                policy: (
                    {"backbone": backbone, "policy": policy, "views": ",".join(tta.policies[policy])},
                    {
                        **{f"oof_{k}": v for k, v in policy_scores.items()},
                        **{f"holdout_{k}": v for k, v in report.get("holdout_policies", {}).get(policy, {}).items()},
                    },
                )
                for policy, policy_scores in report["policies"].items()
            },
            report["policy"],
            tags=tags,
        )
