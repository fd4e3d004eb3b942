"""Backbones by name: a thin wrapper over `timm.create_model`, with pretrained weights from the
Hugging Face hub, a local file, or a finished run of this pipeline."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn as nn
from timm.models import register_model

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
    trains faster per image and learns more per epoch on 2 CPU cores (measured in the README)."""

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


@register_model
def cifar_net_s(pretrained=False, **kwargs) -> CifarNet:
    """Widths 32/64/128: about 960 training images/s at 32 px on 2 CPU cores."""
    return CifarNet((32, 64, 128), **kwargs)


@register_model
def cifar_net_m(pretrained=False, **kwargs) -> CifarNet:
    return CifarNet((48, 128, 192), **kwargs)


@register_model
def cifar_net_l(pretrained=False, **kwargs) -> CifarNet:
    """airbench94's widths, 64/256/256."""
    return CifarNet((64, 256, 256), **kwargs)


# ---------------------------------------------------------------- any timm model by name


def check_backbone(name: str, key: str = "train.backbones") -> None:
    if not timm.is_model(name):
        raise PipelineError(f"{key}: unknown timm model '{name}' (see timm.list_models())")


Pretrained = bool | str | Path | None


def _pipeline_checkpoint(path: Path) -> dict | None:
    """A fold's model.pt of a finished run (or an export of one): the dict with the backbone's name,
    weights and normalisation; None for any other file. Loaded with weights_only=True."""
    if path.suffix not in (".pt", ".pth"):
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not one of ours (a timm .pth with other contents): timm reads it
        return None
    return ckpt if isinstance(ckpt, dict) and {"model", "state_dict", "mean", "std"} <= set(ckpt) else None


def pretrained_config(name: str, pretrained: Pretrained) -> dict | None:
    """The normalisation and input size the pretrained weights were trained with: `mean`, `std`,
    `image_size`, `interpolation`. timm's data config of the model (its tag, or its default one) for
    hub weights and for a local timm file; the run's own for a model.pt of this pipeline; None when
    the weights are random (or timm knows no config for them)."""
    if not pretrained:
        return None
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
    if cfg is None or cfg.mean is None:
        return None
    return {
        "mean": list(cfg.mean),
        "std": list(cfg.std),
        "image_size": cfg.input_size[-1],
        "interpolation": cfg.interpolation,
    }


def create_model(
    name: str, num_classes: int, pretrained: Pretrained = None, drop_rate: float = 0.0, drop_path_rate: float = 0.0
) -> torch.nn.Module:
    """A fresh timm model with a `num_classes` head.

    `pretrained`: None or False, random weights. True: timm's pretrained weights of `name` (its
    default tag, or the one in the name, e.g. convnext_tiny.fb_in22k) from the Hugging Face hub cache,
    downloaded when missing (HF_HOME and HF_HUB_OFFLINE are honoured). A path: a local timm checkpoint
    or .safetensors, or a fold's model.pt of a finished run of this pipeline (or its export), whose
    backbone then transfers to this competition. The classifier is replaced in every case.
    """
    check_backbone(name)
    kwargs = dict(num_classes=num_classes, drop_rate=drop_rate)
    if drop_path_rate:  # only architectures with stochastic depth accept it
        kwargs["drop_path_rate"] = drop_path_rate
    if pretrained is True:
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except (OSError, RuntimeError) as exc:  # the hub's errors (offline, no cache, no network) are OSErrors
            raise PipelineError(
                f"{name}: pretrained weights are neither in the Hugging Face cache nor downloadable "
                f"({exc.__class__.__name__}); run once with internet, or set pretrained to a local timm/.safetensors "
                f"file or to a finished run's models/<backbone>/seed<s>/fold<k>/model.pt (or its export)"
            ) from None
    if pretrained:
        path = Path(pretrained)
        if not path.is_file():
            raise PipelineError(f"{name}: pretrained weights file '{path}' not found")
        ckpt = _pipeline_checkpoint(path)
        if ckpt is None:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
        if ckpt["model"] != name:
            raise PipelineError(f"{name}: pretrained '{path}' holds a {ckpt['model']}, not a {name}")
        model = timm.create_model(name, pretrained=False, **kwargs)
        head_ids = {id(p) for p in model.get_classifier().parameters()}
        head = {n for n, p in model.named_parameters() if id(p) in head_ids}  # replaced: a new competition's
        try:
            missing = model.load_state_dict(
                {k: v for k, v in ckpt["state_dict"].items() if k not in head}, strict=False
            ).missing_keys
        except RuntimeError as exc:  # a tensor of another shape: another architecture or width
            raise PipelineError(
                f"{name}: pretrained '{path}' does not fit the model ({str(exc).splitlines()[-1].strip()})"
            ) from None
        if set(missing) - head:
            raise PipelineError(
                f"{name}: pretrained '{path}' does not fit the model ('{sorted(set(missing) - head)[0]}' missing)"
            )
        return model
    return timm.create_model(name, pretrained=False, **kwargs)


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
