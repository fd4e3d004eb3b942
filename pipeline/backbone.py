"""One backbone as its stages run it: params.yaml's entry resolved into a timm model name, settings,
input size and tuned values (`resolve_backbone`), the plan's epochs applied (`apply_plan`), and the
record a training run is logged and resumed under (`run_record`, `resume_dir`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from pipeline.config import Params, TrainSettings, check_train_settings, resolve_train_settings
from pipeline.data import PreparedData, default_augment
from pipeline.errors import PipelineError
from pipeline.io import read_json
from pipeline.models import Pretrained, check_backbone, pretrained_config


@dataclass(frozen=True)
class Backbone:
    name: str  # its key in train.backbones
    model_name: str  # timm's name
    pretrained: Pretrained
    settings: TrainSettings
    image_size: int  # the network's input side
    tuned: dict  # the tune stage's best values, already merged into `settings`
    # timm's data config of the pretrained weights (mean, std, image_size, interpolation), resolved once by
    # `resolve_backbone`; None: random weights (or weights timm knows no config for)
    weights: dict | None = None
    folds: int | None = None  # the folds trained, 0..folds-1 (cv.train_folds as the plan resolved it); None: all

    def normalization(self, data: PreparedData, k: int) -> tuple[list[float], list[float]]:
        """Mean and std fold k's model sees its inputs normalised with: `train.mean`/`train.std` if set, else
        the pretrained weights' own (what they learnt their features on), else the statistics of fold k's
        training part (never its validation rows)."""
        s = self.settings
        if s.mean is not None:
            return list(s.mean), list(s.std)
        return (self.weights["mean"], self.weights["std"]) if self.weights else data.fold_stats(k)

    @property
    def interpolation(self) -> str:
        """How batches are resized to the input side: `train.interpolation` if set, else the weights' own,
        else bilinear. Recorded in the checkpoint: every TTA view resizes the same way."""
        own = (self.weights or {}).get("interpolation")
        return self.settings.interpolation or (own if own in ("bilinear", "bicubic", "nearest", "area") else "bilinear")

    @property
    def input_side(self) -> int:
        """The network's input side as this backbone's settings train it (a tuning trial may set image_size)."""
        return self.settings.image_size or self.image_size


def tuned_params(path: str | Path) -> dict:
    """The tune stage's best values (empty when tuning is off or has not run)."""
    if not Path(path).exists():
        return {}
    return (yaml.safe_load(Path(path).read_text()) or {}).get("params") or {}


def input_size(s: TrainSettings, weights: dict | None, cache_size: int) -> int:
    """The network's input side: `s.image_size` if set, else the pretrained weights' own, else the cache's
    (`auto`: the same until the plan's choice replaces it, `planned`)."""
    own = s.image_size if isinstance(s.image_size, int) else None
    return own or (weights or {}).get("image_size") or cache_size


def resolve_backbone(
    params: Params, name: str, cache_size: int, params_path: str = "params.yaml", tuning: Path | None = None
) -> Backbone:
    """Backbone `name` as its train stage runs it: params.yaml's keys over the tune stage's best values (in
    `tuning`/best_params.yaml, the tune stage's folder; None: untuned) over the shared settings, checked, the
    default augmentation resolved for the cache's size. Raises PipelineError naming the key for an unknown
    timm model or a setting out of range."""
    entry = params.train.backbones[name]
    model_name = entry.model or name
    check_backbone(model_name, f"{params_path}: train.backbones.{name}")
    best = tuned_params(Path(tuning) / "best_params.yaml") if tuning is not None else {}
    settings = resolve_train_settings(params.train, name, best)
    check_train_settings(settings, f"{params_path}: train")
    weights = pretrained_config(model_name, entry.pretrained)  # the one resolution of timm's data config
    image_size = input_size(settings, weights, cache_size)
    if settings.augment is None:  # recorded as it runs
        settings = dataclasses.replace(settings, augment=default_augment(cache_size))
    return Backbone(name, model_name, entry.pretrained, settings, image_size, best, weights)


def apply_plan(s: TrainSettings, entry: dict | None, epochs: bool = True) -> TrainSettings:
    """A backbone's settings with the plan's choices: `precision: auto` as the plan resolved it here,
    `finetune: auto` and `image_size: auto` as the plan chose them, and
    (with `epochs`, under a budget) its epochs, val_every as planned and the epochs that name a point
    in the schedule (mixup_off_epoch, unfreeze_epoch) moved with it."""
    if entry and s.precision == "auto" and entry.get("precision"):
        s = dataclasses.replace(s, precision=entry["precision"])
    if entry and s.finetune == "auto" and entry.get("finetune"):
        s = dataclasses.replace(s, finetune=entry["finetune"])
    if entry and s.image_size == "auto" and entry.get("image_size"):
        s = dataclasses.replace(s, image_size=entry["image_size"])
    if not epochs or not entry or entry["epochs"] == s.epochs:
        return s
    scale = entry["epochs"] / s.epochs
    moved = {
        key: round(getattr(s, key) * scale)
        for key in ("mixup_off_epoch", "unfreeze_epoch")
        if getattr(s, key) is not None
    }
    return dataclasses.replace(s, epochs=entry["epochs"], val_every=entry["val_every"], **moved)


def planned(backbone: Backbone, plan_dir: str | Path, budget: bool = True) -> Backbone:
    """`backbone` with what the plan stage chose for it (in `plan_dir`/<name>.json): the folds trained, the
    epochs (under `budget`, budget.minutes), the regime of `finetune: auto`, the input side of `image_size: auto`
    and the precision of `precision: auto`.
    With neither a budget nor a plan file, and a set finetune, as it is."""
    path = Path(plan_dir) / f"{backbone.name}.json"
    auto = [key for key in ("finetune", "image_size") if getattr(backbone.settings, key) == "auto"]
    if not path.exists():
        if not budget and not auto:
            return backbone
        needs = "budget.minutes" if budget else f"train.{auto[0]}: auto"
        raise PipelineError(f"{path}: not found; {needs} needs the plan stage first (python -m pipeline plan)")
    entry = read_json(path)
    for key in auto:
        if key not in entry:
            raise PipelineError(f"{path}: no {key} for train.{key}: auto; run the plan stage again")
    settings = apply_plan(backbone.settings, entry, epochs=budget)
    side = settings.image_size if isinstance(settings.image_size, int) else backbone.image_size
    return dataclasses.replace(backbone, settings=settings, image_size=side, folds=entry.get("folds"))


def run_record(backbone: Backbone, data: PreparedData, device: torch.device) -> dict:
    """Everything a training run of `backbone` depends on, flat: MLflow's params of the run, and (without
    the device) what its resume folder is keyed on."""
    s, weights = backbone.settings, backbone.weights
    normalization = "params" if s.mean else "pretrained weights" if weights else "fold statistics"
    return {
        "backbone": backbone.name,
        "model": backbone.model_name,
        "pretrained": backbone.pretrained,
        "device": device.type,
        "normalization": normalization,
        **(
            {
                "weights_mean": weights["mean"],
                "weights_std": weights["std"],
                "weights_interpolation": weights["interpolation"],
            }
            if weights
            else {}
        ),
        **dataclasses.asdict(s),
        "image_size": backbone.image_size,
        "augment": json.dumps(s.augment),
        **{f"tuned.{k}": v for k, v in backbone.tuned.items()},
        "n_folds": data.n_folds,
        "folds_trained": backbone.folds or data.n_folds,
        "n_train": len(data.train),
        "n_classes": len(data.classes),
    }


def resume_dir(record: dict, data: PreparedData, resume_root: Path) -> Path:
    """`resume_root`/<backbone>-<hash> (models/.resume/): where a killed run of these settings, on these rows and folds,
    left its finished folds and last epoch (any other device continues it too)."""
    ids = hashlib.sha1("".join(data.train["id"] + data.train["fold"].astype(str)).encode()).hexdigest()
    fingerprint = json.dumps({**record, "device": None, "ids": ids}, sort_keys=True)
    return Path(resume_root) / f"{record['backbone']}-{hashlib.sha1(fingerprint.encode()).hexdigest()[:12]}"
