"""export: a trained fold model in timm's own sharing format (the `export` command's library)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Params, resolve_train_settings
from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, give_usual_mode, load_checkpoint, read_json, write_json
from pipeline.metrics import argbest
from pipeline.models import create_model


def best_fold_checkpoint(params: Params, backbone: str, folds: dict, models: Path) -> tuple[Path, str, dict]:
    """(path, why, checkpoint) of the fold with the best validation `train.monitor`, first seed of the bag in
    `models` (models/<backbone>/).
    Loaded with weights_only=True."""
    settings = resolve_train_settings(params.train, backbone)
    monitor, names = settings.monitor, sorted(folds, key=int)
    best = names[argbest(monitor, [folds[k][monitor] for k in names])]
    source = Path(models) / f"seed{(settings.seeds or [settings.seed])[0]}" / f"fold{best}" / "model.pt"
    if not source.exists():
        raise PipelineError(f"{source}: not found (the models folder does not match reports/train/{backbone}.json)")
    why = f"best validation {monitor} of {len(names)} folds: {folds[best][monitor]:.4f}"
    return source, why, load_checkpoint(source, f"train it again (dvc repro -f train@{backbone})")


def save_for_timm(ckpt: dict, out: Path, classes: list[str] | None) -> None:
    """`ckpt`'s model as timm's `save_for_hf` writes it, safetensors only: model.safetensors and a
    config.json whose data config is the fold's own (mean, std, input size, interpolation), so that
    `timm.create_model("local-dir:<out>", pretrained=True)` and `timm.data.resolve_data_config` give
    back the model and how to feed it. A features+sklearn fold exports its trunk (no head)."""
    from timm.models import save_for_hf

    model = create_model(ckpt["model"], ckpt["num_classes"] if not ckpt.get("sklearn_head") else 0)  # the head's size
    model.load_state_dict(ckpt["state_dict"])
    size = ckpt["image_size"]
    data = {
        "mean": tuple(ckpt["mean"]),
        "std": tuple(ckpt["std"]),
        "input_size": (3, size, size),
        "interpolation": ckpt.get("interpolation") or "bilinear",
        "crop_pct": 1.0,
    }
    config = {"pretrained_cfg": data}
    if classes and not ckpt.get("sklearn_head") and ckpt["num_classes"] == len(classes):
        config["label_names"] = list(classes)
    save_for_hf(model, str(out), model_config=config, safe_serialization=True)
    for path in Path(out).glob("*.safetensors"):  # written 0600: the mode of the export's other files
        give_usual_mode(path)


def write_export(folder: str | Path, backbone: str, source: Path, chosen_by: str, ckpt: dict, classes: Path) -> None:
    """`folder`: the timm files, and export.json saying which fold, why, and how to feed it."""
    with atomic_dir(folder) as out:
        save_for_timm(ckpt, out, read_json(classes)["classes"] if classes.is_file() else None)
        fields = {k: ckpt.get(k) for k in ("mean", "std", "image_size", "interpolation")}
        info = {"backbone": backbone, "model": ckpt["model"], "from": str(source), "chosen_by": chosen_by, **fields}
        if ckpt.get("target_scale"):  # a regression: the head's output is the target as the fold scaled it
            info["target_scale"] = ckpt["target_scale"]
        write_json(out / "export.json", info)
