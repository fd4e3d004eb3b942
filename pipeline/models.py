"""Backbones by name: a thin wrapper over `timm.create_model`, with pretrained weights from the
Hugging Face hub, a local file, or a finished run of this pipeline."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._hub import load_model_config_from_hf, load_model_config_from_path  # what local-dir:/hf-hub: read

from pipeline.errors import PipelineError

# ---------------------------------------------------------------- small nets for 32 px inputs


class _ConvGroup(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding="same", bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding="same", bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.GELU()

    def forward(self, x):
        x = self.act(self.bn1(self.pool(self.conv1(x))))
        return self.act(self.bn2(self.conv2(x)))


class CifarNet(nn.Module):
    """A 3-group conv net for 32 px images in the style of airbench (Keller Jordan's CIFAR-10 speed
    runs): a 2x2 stem, three (conv, max-pool, conv) groups, global max pooling, a scaled linear head.
    timm's ImageNet backbones spend most of their compute shrinking 224 px inputs; at 32 px this
    trains faster per image and learns more per epoch on 2 CPU cores (docs/results.md, the CIFAR-10 record)."""

    def __init__(self, widths=(32, 64, 128), num_classes: int = 1000, drop_rate: float = 0.0, **_):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = widths[-1]
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 2, bias=True), nn.GELU())
        self.layers = nn.Sequential(
            _ConvGroup(24, widths[0]), _ConvGroup(widths[0], widths[1]), _ConvGroup(widths[1], widths[2])
        )
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes, bias=False) if num_classes else nn.Identity()

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """Data-dependent init (airbench's patch whitening): the 2x2 stem becomes the whitening
        transform of the training images' 2x2 patches, each eigen-direction with both signs, and its
        weights stay fixed. `x`: a normalised batch of training images (N, 3, H, W)."""
        conv = self.stem[0]
        c, kh, kw = conv.in_channels, *conv.kernel_size
        patches = x.float().unfold(2, kh, 1).unfold(3, kw, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * kh * kw)
        patches = patches - patches.mean(0)
        eigval, eigvec = torch.linalg.eigh(patches.T @ patches / len(patches))
        filters = (eigvec.T / torch.sqrt(eigval.clamp_min(0) + eps)[:, None]).flip(0)  # largest first
        filters = torch.cat([filters, -filters])[: conv.out_channels]
        conv.weight.copy_(filters.reshape(-1, c, kh, kw).to(conv.weight))
        conv.bias.zero_()
        conv.weight.requires_grad_(False)

    def group_matcher(self, coarse: bool = False) -> dict:  # timm's API: what `finetune: freeze` freezes
        return {"stem": r"^stem", "blocks": r"^layers\.(\d+)"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool=None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes, bias=False) if num_classes else nn.Identity()

    def forward(self, x):
        x = torch.amax(self.layers(self.stem(x)), dim=(2, 3))
        return self.head(self.drop(x)) / 9 if self.num_classes else x  # /9: airbench's output scale


# timm's registry reads a module's `default_cfgs`: with them the nets are built as timm builds its own
# (build_model_with_cfg), so timm's `pretrained=True` loads their weights from a file or a local-dir:
# folder. They have no published weights: no url or hub id.
default_cfgs = generate_default_cfgs(
    {
        f"cifar_net_{size}": {
            "num_classes": 1000,
            "input_size": (3, 32, 32),
            "pool_size": None,
            "crop_pct": 1.0,
            "interpolation": "bilinear",
            "first_conv": "stem.0",
            "classifier": "head",
        }
        for size in "sml"
    }
)


def _cifar_net(variant: str, widths: tuple, pretrained: bool, **kwargs) -> CifarNet:
    return build_model_with_cfg(CifarNet, variant, pretrained, widths=widths, **kwargs)


@register_model
def cifar_net_s(pretrained=False, **kwargs) -> CifarNet:
    """Widths 32/64/128: about 960 training images/s at 32 px on 2 CPU cores."""
    return _cifar_net("cifar_net_s", (32, 64, 128), pretrained, **kwargs)


@register_model
def cifar_net_m(pretrained=False, **kwargs) -> CifarNet:
    return _cifar_net("cifar_net_m", (48, 128, 192), pretrained, **kwargs)


@register_model
def cifar_net_l(pretrained=False, **kwargs) -> CifarNet:
    """airbench94's widths, 64/256/256."""
    return _cifar_net("cifar_net_l", (64, 256, 256), pretrained, **kwargs)


# ---------------------------------------------------------------- any timm model by name


SOURCES = ("hf-hub:", "local-dir:")  # timm's own prefixes: a model from the hub or a folder timm saved


def weights_folder(pretrained: Pretrained) -> Path | None:
    """The folder of `pretrained` = `local-dir:<folder>` or a folder (timm's save_for_hf format: config.json
    and model.safetensors, as `python -m pipeline export` writes it); None for anything else."""
    if pretrained is None or isinstance(pretrained, bool):
        return None
    text = str(pretrained)
    folder = Path(text[len("local-dir:") :] if text.startswith("local-dir:") else text)
    return folder if text.startswith("local-dir:") or folder.is_dir() else None


def _folder_config(folder: Path, key: str) -> tuple[dict, str]:
    """(pretrained_cfg, architecture) of a timm folder, read as timm reads it; one-line errors."""
    if not (folder / "config.json").is_file():
        raise PipelineError(f"{key}: '{folder}' has no config.json (a folder timm's save_for_hf or export writes)")
    try:
        cfg, architecture, _ = load_model_config_from_path(folder)
    except (ValueError, KeyError) as exc:
        raise PipelineError(f"{folder / 'config.json'}: not a timm config ({exc.__class__.__name__}: {exc})") from None
    return cfg, architecture


def _source_config(name: str, key: str = "train.backbones") -> dict:
    """The pretrained_cfg of an `hf-hub:` or `local-dir:` model name, as timm resolves it."""
    if name.startswith("local-dir:"):
        cfg, architecture = _folder_config(Path(name[len("local-dir:") :]), key)
        if not timm.is_model(architecture):
            raise PipelineError(f"{key}: '{name}' holds a '{architecture}', which timm does not know")
        return cfg
    try:
        return load_model_config_from_hf(name[len("hf-hub:") :])[0]
    except Exception as exc:  # noqa: BLE001 - the hub's errors (offline, no such repo) are many kinds
        raise PipelineError(
            f"{key}: '{name}': its config is neither in the Hugging Face cache nor downloadable "
            f"({exc.__class__.__name__}); run once with internet, or use a local-dir: folder"
        ) from None


def check_backbone(name: str, key: str = "train.backbones") -> None:
    """A timm model name, or timm's `hf-hub:org/name` / `local-dir:folder` (checked when it is resolved)."""
    if name.startswith("local-dir:"):
        _source_config(name, key)
    elif not name.startswith(SOURCES) and not timm.is_model(name):
        raise PipelineError(f"{key}: unknown timm model '{name}' (see timm.list_models())")


Pretrained = bool | str | Path | None


def _pipeline_checkpoint(path: Path) -> dict | None:
    """A fold's model.pt of a finished run: the dict with the backbone's name, weights and
    normalisation; None for any other file. Loaded with weights_only=True."""
    if path.suffix not in (".pt", ".pth"):
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not one of ours (a timm .pth with other contents): timm reads it
        return None
    return ckpt if isinstance(ckpt, dict) and {"model", "state_dict", "mean", "std"} <= set(ckpt) else None


def _data_config(cfg) -> dict | None:
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    if get("mean") is None:
        return None
    return {
        "mean": list(get("mean")),
        "std": list(get("std")),
        "image_size": get("input_size")[-1],
        "interpolation": get("interpolation") or "bilinear",
    }


def pretrained_config(name: str, pretrained: Pretrained) -> dict | None:
    """The normalisation and input size the pretrained weights were trained with: `mean`, `std`,
    `image_size`, `interpolation`. timm's data config: of an `hf-hub:`/`local-dir:` name or folder
    (its config.json), else of the model (its tag, or its default one) for hub weights and for a local
    timm file; the run's own for a model.pt of this pipeline; None when the weights are random (or
    timm knows no config for them)."""
    if not pretrained:
        return None
    folder = weights_folder(pretrained)
    if folder is not None:
        return _data_config(_folder_config(folder, "pretrained")[0])
    if name.startswith(SOURCES):
        return _data_config(_source_config(name))
    if not isinstance(pretrained, bool):
        ckpt = _pipeline_checkpoint(Path(pretrained))
        if ckpt is not None:
            return {
                "mean": list(ckpt["mean"]),
                "std": list(ckpt["std"]),
                "image_size": ckpt.get("image_size"),
                "interpolation": "bilinear",
            }
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):  # no weights published: random
        return None
    return _data_config(cfg)


def _load_trunk(model: torch.nn.Module, state_dict: dict, source: Path, name: str) -> torch.nn.Module:
    """`state_dict` into `model` but for the classifier, which stays new (a new competition's)."""
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    head = {n for n, p in model.named_parameters() if id(p) in head_ids}
    try:
        missing = model.load_state_dict({k: v for k, v in state_dict.items() if k not in head}, strict=False)
    except RuntimeError as exc:  # a tensor of another shape: another architecture or width
        raise PipelineError(
            f"{name}: pretrained '{source}' does not fit the model ({str(exc).splitlines()[-1].strip()})"
        ) from None
    if set(missing.missing_keys) - head:
        first = sorted(set(missing.missing_keys) - head)[0]
        raise PipelineError(f"{name}: pretrained '{source}' does not fit the model ('{first}' missing)")
    return model


def _from_folder(name: str, folder: Path, kwargs: dict) -> torch.nn.Module:
    """`name` with the trunk of the timm folder `folder` (config.json + model.safetensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _, architecture = _folder_config(folder, "pretrained")
    if architecture != timm.models.split_model_name_tag(name)[0]:
        raise PipelineError(f"{name}: pretrained '{folder}' holds a {architecture}, not a {name}")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise PipelineError(f"{name}: pretrained '{folder}' has no model.safetensors")
    try:
        state_dict = load_file(weights)
    except (SafetensorError, OSError) as exc:
        raise PipelineError(f"{weights}: cannot read ({exc.__class__.__name__}: {exc})") from None
    return _load_trunk(timm.create_model(name, pretrained=False, **kwargs), state_dict, folder, name)


def _timm_pretrained(name: str, kwargs: dict, file: Path | None = None) -> torch.nn.Module:
    """timm's own loading (hub weights, an `hf-hub:`/`local-dir:` name, or a local timm file), with the
    head always new and sized for the competition: timm keeps the weights' head when the class counts
    happen to match (a 1,000-class competition would start from ImageNet's classifier)."""
    overlay = {"pretrained_cfg_overlay": dict(file=str(file))} if file else {}
    try:
        model = timm.create_model(name, pretrained=True, **overlay, **kwargs)
    except (OSError, RuntimeError) as exc:  # the hub's errors (offline, no cache, no network) are OSErrors
        if file:
            reason = f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[-1][:200]}"
            raise PipelineError(f"{name}: pretrained '{file}' cannot be loaded ({reason})") from None
        raise PipelineError(
            f"{name}: pretrained weights are neither in the Hugging Face cache nor downloadable "
            f"({exc.__class__.__name__}); run once with internet, or set pretrained to a local timm/.safetensors "
            f"file, a timm folder (local-dir:, or an export), or a finished run's "
            f"models/<backbone>/seed<s>/fold<k>/model.pt"
        ) from None
    model.reset_classifier(kwargs["num_classes"])
    return model


def create_model(
    name: str, num_classes: int, pretrained: Pretrained = None, drop_rate: float = 0.0, drop_path_rate: float = 0.0
) -> torch.nn.Module:
    """A fresh timm model with a new `num_classes` head.

    `name`: a timm model name (a tag picks its weights, e.g. convnext_tiny.fb_in22k), or timm's
    `hf-hub:org/name` or `local-dir:folder`. `pretrained`: None or False, random weights. True: timm's
    pretrained weights of `name` from the Hugging Face hub cache, downloaded when missing (HF_HOME and
    HF_HUB_OFFLINE are honoured), or the folder's. A timm folder (`local-dir:folder`, or a folder such
    as an export): its trunk. A file: a local timm checkpoint or .safetensors, or a fold's model.pt of
    a finished run of this pipeline. The classifier is new in every case.
    """
    check_backbone(name)
    kwargs = dict(num_classes=num_classes, drop_rate=drop_rate)
    if drop_path_rate:  # only architectures with stochastic depth accept it
        kwargs["drop_path_rate"] = drop_path_rate
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    if pretrained is True:
        return _timm_pretrained(name, kwargs)
    folder = weights_folder(pretrained)
    if folder is not None:
        return _from_folder(name, folder, kwargs)
    path = Path(pretrained)
    if not path.is_file():
        raise PipelineError(f"{name}: pretrained weights file '{path}' not found")
    ckpt = _pipeline_checkpoint(path)
    if ckpt is None:
        return _timm_pretrained(name, kwargs, file=path)
    if ckpt["model"] != name:
        raise PipelineError(f"{name}: pretrained '{path}' holds a {ckpt['model']}, not a {name}")
    return _load_trunk(timm.create_model(name, pretrained=False, **kwargs), ckpt["state_dict"], path, name)


def pick_device() -> torch.device:
    """CUDA, then Apple MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def use_channels_last(device: torch.device) -> bool:
    """NHWC memory layout for conv nets on CUDA and on the CPU, where oneDNN's convolutions are faster
    in it (measured on 2 cores at 32 px: 1.26x training and 1.8x inference images/s for cifar_net_s,
    1.1x for resnet10t; bench/profile_training.py)."""
    return device.type in ("cuda", "cpu")
