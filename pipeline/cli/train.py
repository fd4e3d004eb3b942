"""python -m pipeline train --backbone NAME  ->  models/NAME/, reports/train/NAME.json

A killed run started again with the same command resumes: finished folds and the last completed
epoch of the unfinished fold wait in models/.resume/NAME-<hash of the resolved settings>/.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import albumentations as A
import yaml

from pipeline import distributed
from pipeline.cli import experiment_name, load_with_backbone, parse_args
from pipeline.config import Params, TrainSettings, check_train_settings, flatten, resolve_train_settings, to_dict
from pipeline.data import build_train_transform, default_augment, load_prepared
from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, read_json, write_json
from pipeline.models import check_backbone, pick_device, pretrained_config
from pipeline.plan import PLAN, apply_plan
from pipeline.probs import probs_frame
from pipeline.tracking import Tracker
from pipeline.train import input_size, train_backbone


def _tuned_params(path: str) -> dict:
    """The tune stage's best values (empty when tuning is off or has not run)."""
    if not Path(path).exists():
        return {}
    return (yaml.safe_load(Path(path).read_text()) or {}).get("params") or {}


def backbone_settings(params: Params, backbone: str, cache_size: int, params_path: str
                      ) -> tuple[str, TrainSettings, int, dict]:
    """(timm model name, settings, input size, tuned values) of one backbone, as its train stage runs it:
    params.yaml's keys over the tune stage's best values over the shared settings, checked, the default
    augmentation resolved for the cache's size (before the plan's epochs: `apply_plan`)."""
    entry = params.train.backbones[backbone]
    model_name = entry.model or backbone
    check_backbone(model_name, f"{params_path}: train.backbones.{backbone}")
    tuned = _tuned_params(f"tuning/{backbone}/best_params.yaml")
    settings = resolve_train_settings(params.train, backbone, tuned)
    check_train_settings(settings, f"{params_path}: train")
    image_size = input_size(settings, model_name, entry.pretrained, cache_size)
    if settings.augment is None:  # recorded as it runs
        settings = dataclasses.replace(settings, augment=default_augment(cache_size))
    return model_name, settings, image_size, tuned


def main(argv=None) -> None:
    args = parse_args(argv, __doc__, backbone=True)
    params, backbone = load_with_backbone(args)
    entry = params.train.backbones[backbone]
    data = load_prepared()
    model_name, settings, image_size, tuned = backbone_settings(params, backbone, data.train_images.shape[1], args.params)
    if params.budget.minutes is not None:
        plan = Path(PLAN) / f"{backbone}.json"
        if not plan.exists():
            raise PipelineError(f"{plan}: not found; budget.minutes needs the plan stage first (python -m pipeline plan)")
        settings = apply_plan(settings, read_json(plan))
    device = distributed.init_from_env() or pick_device()
    main = distributed.is_main()
    weights = pretrained_config(model_name, entry.pretrained)
    normalization = "params" if settings.mean else "pretrained weights" if weights else "fold statistics"
    resolved = {"backbone": backbone, "model": model_name, "pretrained": entry.pretrained, "device": device.type,
                "normalization": normalization, **({"weights_mean": weights["mean"], "weights_std": weights["std"],
                                                   "weights_interpolation": weights["interpolation"]} if weights else {}),
                **dataclasses.asdict(settings), "image_size": image_size, "augment": json.dumps(settings.augment),
                **{f"tuned.{k}": v for k, v in tuned.items()}, "n_folds": data.n_folds, "n_train": len(data.train), "n_classes": len(data.classes)}
    fingerprint = json.dumps({**resolved, "device": None, "ids": hashlib.sha1(
        "".join(data.train["id"] + data.train["fold"].astype(str)).encode()).hexdigest()}, sort_keys=True)
    resume_dir = f"models/.resume/{backbone}-{hashlib.sha1(fingerprint.encode()).hexdigest()[:12]}"
    if main:
        print(f"train {backbone} ({model_name}, {settings.finetune}) on {device.type}"
              f"{f' x {distributed.world_size()} processes' if distributed.is_distributed() else ''}: "
              f"{data.n_folds} folds x {settings.epochs} epochs")

    tracker = Tracker(params.tracking.enabled and main, experiment_name(params))
    with tracker.run(backbone, params=flatten(resolved), tags={"stage": "train", "backbone": backbone},
                     resume=Path(resume_dir) / "mlflow_run_id"):  # a resumed stage continues its run
        with atomic_dir(f"models/{backbone}") if main else tempfile.TemporaryDirectory() as out:
            oof, metrics = train_backbone(data, backbone, model_name, settings, image_size, out, device, tracker,
                                          pretrained=entry.pretrained, resume_dir=resume_dir)
            if main:
                probs_frame(data.train["id"], oof, data.classes).to_csv(out / "oof_probs.csv", index=False)
                (out / "params.yaml").write_text(yaml.safe_dump({"resolved": resolved, "params": to_dict(params)}))
                (out / "augment.json").write_text(json.dumps(A.to_dict(build_train_transform(
                    settings.augment, settings.seed, p=settings.augment_p)), indent=2))  # A.from_dict replays it
        tracker.log_artifact(f"models/{backbone}/augment.json")
        tracker.log_artifact(f"models/{backbone}/oof_probs.csv")
        tracker.log_artifact(f"models/{backbone}/params.yaml")
        if params.tracking.log_models:
            for seed_dir in sorted(Path(f"models/{backbone}").glob("seed*")):
                tracker.log_artifacts(str(seed_dir), f"models/{seed_dir.name}")
        tracker.log_params({"precision_chosen": metrics["precision"],
                            **{f"probe_{k}": round(v, 1) for k, v in (metrics["precision_probe"] or {}).items()}})
        tracker.log_metrics({f"cv_{m}": v for m, v in metrics["oof"].items()})
        tracker.log_metrics({f"cv_fold_mean_{m}": v for m, v in metrics["fold_mean"].items()})
    distributed.shutdown()
    if not main:
        return
    write_json(f"reports/train/{backbone}.json", metrics)
    shutil.rmtree(resume_dir, ignore_errors=True)
    shown = dict.fromkeys([settings.monitor, "accuracy", "log_loss"])
    print(f"{backbone}: OOF " + ", ".join(f"{m} {metrics['oof'][m]:.4f}" for m in shown))
