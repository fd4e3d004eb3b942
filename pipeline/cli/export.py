"""python -m pipeline export --backbone NAME  ->  exports/NAME/{model.safetensors,config.json,export.json}

One fold model of a finished `train@NAME` in timm's own sharing format (`timm.models.save_for_hf`):
plain timm loads it with `timm.create_model("local-dir:exports/NAME", pretrained=True)` (a Kaggle
notebook with the folder attached as a dataset, too), and this pipeline takes it as `pretrained:
exports/NAME` in another competition, with its normalisation, input size and interpolation.
The exported model is the fold with the best validation `train.monitor` (the first seed of a bag):
fold models start from different random weights, so averaging them would not give a working network.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.cli import load_with_backbone, parse_args
from pipeline.errors import PipelineError
from pipeline.export import best_fold_checkpoint, write_export
from pipeline.io import read_json
from pipeline.paths import RunPaths


def main(argv=None) -> None:
    args = parse_args(argv, __doc__, backbone=True)
    params, backbone = load_with_backbone(args)
    paths = RunPaths(Path("."))
    report = paths.report("train", backbone)
    if not report.exists():
        raise PipelineError(f"{report}: no finished training of '{backbone}' (run `dvc repro train@{backbone}`)")
    source, chosen_by, ckpt = best_fold_checkpoint(params, backbone, read_json(report)["folds"], paths.models(backbone))
    classes = paths.prepared / "classes.json"
    write_export(f"exports/{backbone}", backbone, source, chosen_by, ckpt, classes)
    print(
        f"exported {source} ({chosen_by}) -> exports/{backbone}/ (timm's format); use it as pretrained: "
        f"exports/{backbone} with model: {ckpt['model']}, or as timm.create_model('local-dir:exports/{backbone}')"
    )
