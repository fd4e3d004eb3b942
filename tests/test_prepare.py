import shutil
import zipfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.config import CompetitionConfig
from pipeline.data import load_prepared
from pipeline.errors import PipelineError
from pipeline.prepare import prepare, sort_classes
from tests.conftest import write_competition


def run_prepare(comp: CompetitionConfig, out, n_folds=2, size=8, raw_dir=None):
    return prepare(comp, image_size=size, n_folds=n_folds, seed=0, out_dir=out, workers=1,
                   raw_dir=raw_dir or out.parent / "raw")


def test_folder_competition_is_prepared(comp_config, tmp_path):
    out = tmp_path / "prepared"
    summary = run_prepare(comp_config, out, n_folds=4)
    data = load_prepared(out)
    assert summary["n_train"] == 24 and summary["n_test"] == 6
    assert data.classes == ["cat", "dog", "frog"]
    assert data.train_images.shape == (24, 8, 8, 3) and data.train_images.dtype == np.uint8
    # labels keep their original values and map to class indices
    assert (np.array(data.classes)[data.train["target"]] == data.train["label"]).all()
    # stratified folds: each class spread evenly over the 4 folds
    counts = pd.crosstab(data.train["label"], data.train["fold"])
    assert counts.shape == (3, 4) and (counts.to_numpy() == 2).all()
    # test order is the sample submission's
    sample = pd.read_csv(comp_config.source + "/sample_submission.csv", dtype=str)
    assert data.test["id"].tolist() == sample["id"].tolist()
    # the cached image is the decoded file, resized
    first = data.train["id"][0]
    expected = Image.open(f"{comp_config.source}/train/{first}.jpg").convert("RGB").resize((8, 8), Image.BILINEAR)
    assert np.array_equal(data.train_images[0], np.asarray(expected))


def test_original_image_sizes_are_recorded(tmp_path):
    root = write_competition(tmp_path / "comp")
    Image.new("RGB", (40, 10), (200, 0, 0)).save(root / "train" / "tr0000.jpg")  # a wide photo
    Image.new("RGB", (7, 30), (200, 0, 0)).save(root / "test" / "te000.jpg")  # a tall one
    out = tmp_path / "prepared"
    run_prepare(CompetitionConfig(source=str(root)), out)
    data = load_prepared(out)
    sizes = data.train.set_index("id")[["width", "height"]]
    assert sizes.loc["tr0000"].tolist() == [40, 10] and sizes.loc["tr0001"].tolist() == [12, 12]
    assert data.test[["width", "height"]].iloc[0].tolist() == [7, 30]
    assert data.train_images.shape[1:] == (8, 8, 3)  # the cache itself is square


def test_normalisation_stats_come_from_training_folds_only(comp_config, tmp_path):
    out = tmp_path / "prepared"
    run_prepare(comp_config, out, n_folds=3)
    data = load_prepared(out)
    images = np.asarray(data.train_images, dtype=np.float64) / 255
    np.testing.assert_allclose(data.stats["mean"], images.mean((0, 1, 2)), atol=1e-9)
    np.testing.assert_allclose(data.stats["std"], images.std((0, 1, 2)), atol=1e-7)
    for k in range(3):
        part = images[data.train["fold"].to_numpy() != k]
        mean, std = data.fold_stats(k)
        np.testing.assert_allclose(mean, part.mean((0, 1, 2)), atol=1e-9)
        np.testing.assert_allclose(std, part.std((0, 1, 2)), atol=1e-7)
        assert not np.allclose(mean, images[data.train["fold"].to_numpy() == k].mean((0, 1, 2)))


def test_zip_with_top_folder_and_integer_labels(tmp_path):
    root = write_competition(tmp_path / "digits-comp", labels=("2", "10", "7"), ext=".png")
    archive = tmp_path / "comp.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in root.rglob("*"):
            zf.write(path, path.relative_to(tmp_path))  # members under digits-comp/
    out = tmp_path / "prepared"
    run_prepare(CompetitionConfig(source=str(archive), image_ext=".png"), out)
    data = load_prepared(out)
    assert data.classes == ["2", "7", "10"]  # numeric order, original strings
    assert len(data.train) == 24 and len(data.test) == 6


def test_sort_classes():
    assert sort_classes(["b", "a", "c"]) == ["a", "b", "c"]
    assert sort_classes(["10", "9", "1"]) == ["1", "9", "10"]


def test_max_train_rows_is_a_stratified_subsample(tmp_path):
    root = write_competition(tmp_path / "comp", n_per_class=10)
    out = tmp_path / "prepared"
    run_prepare(CompetitionConfig(source=str(root), max_train_rows=15), out)
    data = load_prepared(out)
    assert len(data.train) == 15 and len(data.train_images) == 15
    assert data.train["label"].value_counts().to_dict() == {"cat": 5, "dog": 5, "frog": 5}


def test_group_column_keeps_groups_in_one_fold(tmp_path):
    root = write_competition(tmp_path / "comp", n_per_class=12)
    train = pd.read_csv(root / "train.csv")
    train["patient"] = [f"p{i // 2}" for i in range(len(train))]
    train.to_csv(root / "train.csv", index=False)
    out = tmp_path / "prepared"
    run_prepare(CompetitionConfig(source=str(root), group_column="patient"), out, n_folds=3)
    data = load_prepared(out)
    assert data.train.groupby("group")["fold"].nunique().max() == 1
    assert data.train["fold"].nunique() == 3


def test_sklearn_digits_is_rendered_as_a_kaggle_competition(tmp_path):
    out = tmp_path / "prepared"
    summary = prepare(CompetitionConfig(), image_size=16, n_folds=5, seed=0, out_dir=out, workers=2,
                      raw_dir=tmp_path / "raw")
    raw = tmp_path / "raw" / "sklearn-digits"
    assert {p.name for p in raw.iterdir()} >= {"train", "test", "train.csv", "sample_submission.csv", "solution.csv"}
    assert summary["n_train"] == 1437 and summary["n_test"] == 360  # 80 / 20
    data = load_prepared(out)
    answers = pd.read_csv(out / "answers.csv", dtype=str)
    assert answers["id"].tolist() == data.test["id"].tolist()
    assert set(data.train["id"]).isdisjoint(answers["id"])
    assert data.classes == [str(i) for i in range(10)]


# ---------------------------------------------------------------- bad input


def _corrupt(root):
    (root / "train" / "tr1002.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return "tr1002.jpg"


def _missing_image(root):
    (root / "train" / "tr2005.jpg").unlink()
    return "tr2005.jpg"


def _drop_column(column):
    def mutate(root):
        pd.read_csv(root / "train.csv").drop(columns=column).to_csv(root / "train.csv", index=False)
        return f"no column '{column}'"
    return mutate


def _duplicate_id(root):
    train = pd.read_csv(root / "train.csv")
    train.loc[5, "id"] = train.loc[4, "id"]
    train.to_csv(root / "train.csv", index=False)
    return "duplicate id 'tr0004' (row 7)"


def _extra_test_image(root):
    shutil.copy(root / "test" / "te000.jpg", root / "test" / "te999.jpg")
    return "te999.jpg: test image has no row in"


def _extra_sample_row(root):
    sample = pd.read_csv(root / "sample_submission.csv")
    pd.concat([sample, pd.DataFrame({"id": ["te777"], "label": ["cat"]})]).to_csv(
        root / "sample_submission.csv", index=False)
    return "id 'te777' has no image"


def _rare_class(root):
    train = pd.read_csv(root / "train.csv")
    train.loc[0, "label"] = "newt"
    train.to_csv(root / "train.csv", index=False)
    return "class 'newt' has 1 examples, fewer than cv.n_folds=2"


@pytest.mark.parametrize("mutate", [
    _corrupt, _missing_image, _drop_column("id"), _drop_column("label"), _duplicate_id,
    _extra_test_image, _extra_sample_row, _rare_class,
], ids=["corrupt-image", "missing-image", "no-id-column", "no-label-column", "duplicate-id",
        "test-image-without-row", "row-without-test-image", "class-smaller-than-folds"])
def test_bad_input_is_named_and_leaves_previous_outputs(comp_config, tmp_path, mutate):
    out = tmp_path / "prepared"
    run_prepare(comp_config, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    expected = mutate(tmp_path / "comp")
    with pytest.raises(PipelineError) as info:
        run_prepare(comp_config, out)
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing lost, nothing half-written
    assert not list(tmp_path.glob("prepared.tmp*"))


def test_missing_source_is_named(tmp_path):
    with pytest.raises(PipelineError, match="competition.source: '.*nowhere' does not exist"):
        run_prepare(CompetitionConfig(source=str(tmp_path / "nowhere")), tmp_path / "prepared")
