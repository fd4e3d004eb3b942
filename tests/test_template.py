"""`python -m pipeline init`: the preset of one's own competition, from what its files hold (layout, columns,
image sizes, class counts), in the two layouts Kaggle uses; what it writes is a valid preset that prepare
reads; its rules (input size, cache, resize, holdout, members) as documented; bad input named."""

import io
import zipfile

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pipeline import __main__ as cli
from pipeline.errors import PipelineError
from pipeline.presets import load_preset
from pipeline.template import (
    BACKBONES,
    HOLDOUT_CLASS_ROWS,
    HOLDOUT_ROWS,
    LITE0_TRAIN_IMAGES_PER_S,
    MIN_EPOCHS,
    MIN_INPUT,
    holdout_share,
    input_size,
    main,
    members,
)


def _image(rng, w: int, h: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def _folders_zip(path, sizes) -> None:
    """An ImageFolder competition in a zip: train/<class>/<file>.png at `sizes` (cycled), test/, a sample."""
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as z:
        for i in range(12):
            w, h = sizes[i % len(sizes)]
            for name in (f"train/{'ab'[i % 2]}/f{i}.png", f"test/t{i}.png"):
                buf = io.BytesIO()
                _image(rng, w, h).save(buf, format="PNG")
                z.writestr(name, buf.getvalue())
        z.writestr("sample_submission.csv", "id,label\n" + "".join(f"t{i},a\n" for i in range(12)))


def _csv_folder(root, n: int = 30) -> None:
    """APTOS-like names: train_labels.csv (id_code, diagnosis, a note), train_images/<id>.jpg at 100x100,
    test_images/, sample_submission.csv (id_code, diagnosis)."""
    rng = np.random.default_rng(1)
    (root / "train_images").mkdir(parents=True)
    (root / "test_images").mkdir()
    ids = [f"c{i:03d}" for i in range(n)]
    for i in ids:
        _image(rng, 100, 100).save(root / "train_images" / f"{i}.jpg")
    for i in range(4):
        _image(rng, 100, 100).save(root / "test_images" / f"q{i}.jpg")
    pd.DataFrame({"id_code": ids, "diagnosis": [k % 3 for k in range(n)], "note": "x"}).to_csv(
        root / "train_labels.csv", index=False
    )
    pd.DataFrame({"id_code": [f"q{i}" for i in range(4)], "diagnosis": 0}).to_csv(
        root / "sample_submission.csv", index=False
    )


def _init(tmp_path, source, *flags) -> dict:
    out = tmp_path / "mine.yaml"
    assert cli.main(["init", str(source), "--out", str(out), *flags]) == 0
    load_preset(str(out))  # a valid preset: every key exists, with the right type
    return yaml.safe_load(out.read_text())


def test_an_image_folder_zip_of_mixed_aspect_ratios(tmp_path):
    source = tmp_path / "shop.zip"
    _folders_zip(source, [(120, 80), (80, 120), (120, 120)])
    preset = _init(tmp_path, source, "--budget", "0")
    comp = preset["competition"]
    assert comp["train_csv"] is None and comp["train_dir"] == "train" and comp["test_dir"] == "test"
    assert comp["image_ext"] == ".png" and comp["sample_submission"] == "sample_submission.csv"
    assert preset["prepare"]["resize"] == "pad"  # mixed aspect ratios: letterboxed, side = the long one (120)
    assert preset["train"]["image_size"] == 96  # every Lite's input (224+) capped at 120, a multiple of 32
    assert preset["prepare"]["image_size"] == 110  # 96 / 0.875 of crop room, under the native 120
    assert list(preset["train"]["backbones"]) == [b for b, _ in BACKBONES]  # no budget: all three
    assert preset["cv"]["holdout"] is None and preset["budget"]["minutes"] is None  # 12 rows: no holdout
    assert preset["train"]["finetune"] == "auto"  # the regime: the plan's choice (measured or its rule)


def test_a_csv_folder_with_its_own_names_prepares(tmp_path, monkeypatch):
    root = tmp_path / "aptos"
    _csv_folder(root)
    preset = _init(tmp_path, root, "--metric", "quadratic_weighted_kappa")
    comp = preset["competition"]
    assert (comp["train_csv"], comp["id_column"], comp["label_column"]) == ("train_labels.csv", "id_code", "diagnosis")
    assert (comp["train_dir"], comp["test_dir"], comp["image_ext"]) == ("train_images", "test_images", ".jpg")
    assert comp["metric"] == "quadratic_weighted_kappa"
    assert preset["prepare"] == {"image_size": 100, "resize": "squash"}  # 100x100: alike, squash; cache native
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({k: preset[k] for k in ("competition", "prepare", "cv")}))
    assert cli.main(["prepare"]) == 0  # prepare reads the competition as init found it
    train = pd.read_csv(tmp_path / "data/prepared/train.csv")
    assert len(train) == 30 and set(train["label"]) == {0, 1, 2}


def test_the_rules_input_size_holdout_and_members():
    assert input_size(224, 500) == 224 and input_size(260, 200) == 192 and input_size(224, 32) == MIN_INPUT
    assert holdout_share(HOLDOUT_ROWS, np.array([HOLDOUT_CLASS_ROWS] * 3)) == 0.1
    assert holdout_share(HOLDOUT_ROWS - 1, None) is None
    assert holdout_share(5000, np.array([HOLDOUT_CLASS_ROWS - 1, 900])) is None  # a rare class stays in the folds
    inputs, costs = {b: 96 for b, _ in BACKBONES}, dict(BACKBONES)
    seconds = [MIN_EPOCHS * 2 * 1000 * costs[b] / LITE0_TRAIN_IMAGES_PER_S for b in inputs]  # 3 folds, 1000 rows
    two = (seconds[0] + seconds[1]) * 2 / 60  # minutes: half of them train the first two
    assert members(inputs, costs, 1000, 3, two) == list(inputs)[:2]
    assert members(inputs, costs, 1000, 3, two * 0.99) == list(inputs)[:1]
    assert members(inputs, costs, 1000, 3, 0.01) == list(inputs)[:1]  # always one: the plan names the minimum
    assert members(inputs, costs, 1000, 3, None) == list(inputs)


def test_bad_input_is_named(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["init", str(tmp_path / "empty"), "--out", str(tmp_path / "x.yaml")]) == 1
    assert "no train CSV and no train/ folder" in capsys.readouterr().err
    root = tmp_path / "aptos"
    _csv_folder(root)
    labels = pd.read_csv(root / "train_labels.csv")
    labels.assign(id_code="zz" + labels["id_code"]).to_csv(root / "train_labels.csv", index=False)
    assert cli.main(["init", str(root), "--out", str(tmp_path / "x.yaml")]) == 1
    assert "train_labels.csv: its first ids match no image" in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()  # nothing half-written
    (tmp_path / "x.yaml").write_text("mine")
    with pytest.raises(PipelineError, match="x.yaml: exists"):
        main([str(root), "--out", str(tmp_path / "x.yaml")])
    assert (tmp_path / "x.yaml").read_text() == "mine"
