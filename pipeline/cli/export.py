"""python -m pipeline export --backbone NAME  ->  exports/NAME/model.pt + export.json (not a DVC stage)

Writes one fold model of a finished `train@NAME` as a checkpoint timm loads (the `state_dict` key of a
dict, as `timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))` reads it) and
this pipeline takes as `pretrained` in another competition, with its input normalisation and size.
The exported model is the fold with the best validation `train.monitor` (the first seed of a bag):
fold models start from different random weights, so averaging them would not give a working network.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.cli import load_with_backbone, parse_args
from pipeline.config import resolve_train_settings
from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, read_json, write_json
from pipeline.metrics import argbest


def main(argv=None) -> None:
    args = parse_args(argv, __doc__, backbone=True)
    params, backbone = load_with_backbone(args)
    report_path = Path(f"reports/train/{backbone}.json")
    if not report_path.exists():
        raise PipelineError(f"{report_path}: no finished training of '{backbone}' (run `dvc repro train@{backbone}`)")
    folds = read_json(report_path)["folds"]
    settings = resolve_train_settings(params.train, backbone)
    monitor = settings.monitor
    names = sorted(folds, key=int)
    best = names[argbest(monitor, [folds[k][monitor] for k in names])]
    seed = (settings.seeds or [settings.seed])[0]
    source = Path(f"models/{backbone}/seed{seed}/fold{best}/model.pt")
    if not source.exists():
        raise PipelineError(f"{source}: not found (the models folder does not match {report_path})")
    ckpt = torch.load(source, map_location="cpu", weights_only=True)
    with atomic_dir(f"exports/{backbone}") as out:
        torch.save(ckpt, out / "model.pt")
        write_json(
            out / "export.json",
            {
                "backbone": backbone,
                "model": ckpt["model"],
                "from": str(source),
                "chosen_by": f"best validation {monitor} of the folds ({folds[best][monitor]:.4f})",
                "mean": ckpt["mean"],
                "std": ckpt["std"],
                "image_size": ckpt["image_size"],
            },
        )
    print(
        f"exported {source} ({monitor} {folds[best][monitor]:.4f}, the best of {len(names)} folds) -> "
        f"exports/{backbone}/model.pt; use it as train.backbones.<name>.pretrained with model: {ckpt['model']}"
    )
