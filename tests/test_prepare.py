import dataclasses
import multiprocessing as mp
import re
import shutil
import signal
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import cache as cache_module
from pipeline.config import CompetitionConfig
from pipeline.data import load_prepared
from pipeline.errors import PipelineError
from pipeline.io import stop_on_signals, uninterrupted
from pipeline.prepare import DIGITS_MARKER, prepare
from pipeline.tasks.single_label import sort_classes
from tests.conftest import make_image, write_competition


def run_prepare(comp: CompetitionConfig, out, n_folds=2, size=8):
    return prepare(comp, image_size=size, n_folds=n_folds, seed=0, out_dir=out, workers=1)


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
    raw = tmp_path / "raw" / "sklearn-digits"
    raw.mkdir(parents=True)
    (raw / DIGITS_MARKER).write_text("render here")
    summary = prepare(CompetitionConfig(source=str(raw)), image_size=16, n_folds=5, seed=0, out_dir=out, workers=2)
    assert {p.name for p in raw.iterdir()} >= {"train", "test", "train.csv", "sample_submission.csv", "solution.csv"}
    assert (raw / DIGITS_MARKER).read_text() == "render here"  # the tracked source keeps its marker
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
        root / "sample_submission.csv", index=False
    )
    return "id 'te777' has no image"


def _rare_class(root):
    train = pd.read_csv(root / "train.csv")
    train.loc[0, "label"] = "newt"
    train.to_csv(root / "train.csv", index=False)
    return "class 'newt' has 1 examples, fewer than cv.n_folds=2"


def _nan_label(root):
    train = pd.read_csv(root / "train.csv", dtype=str)
    train.loc[[3, 7], "label"] = "NaN"  # as pandas writes a missing value: not an extra class
    train.to_csv(root / "train.csv", index=False)
    return "train.csv: row 5: label 'NaN' marks a missing value, not a class (2 such rows)"


def _header_only(root):
    (root / "train.csv").write_text("id,label\n")
    return "train.csv: no rows"


@pytest.mark.parametrize(
    "mutate",
    [
        _corrupt,
        _missing_image,
        _drop_column("id"),
        _drop_column("label"),
        _duplicate_id,
        _extra_test_image,
        _extra_sample_row,
        _rare_class,
        _nan_label,
        _header_only,
    ],
    ids=[
        "corrupt-image",
        "missing-image",
        "no-id-column",
        "no-label-column",
        "duplicate-id",
        "test-image-without-row",
        "row-without-test-image",
        "class-smaller-than-folds",
        "nan-label",
        "header-only",
    ],
)
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


# ---------------------------------------------------------------- layouts


def test_ids_that_carry_their_extension_are_found_with_or_without_image_ext(tmp_path):
    root = write_competition(tmp_path / "comp")  # Cassava: image_id = 1000015157.jpg
    for name in ("train.csv", "sample_submission.csv", "solution.csv"):
        frame = pd.read_csv(root / name, dtype=str)
        frame["id"] = frame["id"] + ".jpg"
        frame.to_csv(root / name, index=False)
    for ext in ("", ".jpg"):
        out = tmp_path / f"prepared{ext}"
        summary = run_prepare(CompetitionConfig(source=str(root), image_ext=ext), out)
        assert (summary["n_train"], summary["n_test"]) == (24, 6)
        assert load_prepared(out).test["id"].tolist()[0] == "te000.jpg"


def test_path_column_reads_nested_folders_with_mixed_extensions(tmp_path):
    root = write_competition(tmp_path / "comp")
    train = pd.read_csv(root / "train.csv", dtype=str)
    paths = []
    for i, image_id in enumerate(train["id"]):  # train/<i % 3>/<id>.png or .jpg
        ext = ".png" if i % 2 else ".jpg"
        (root / "train" / str(i % 3)).mkdir(exist_ok=True)
        Image.open(root / "train" / f"{image_id}.jpg").save(root / "train" / str(i % 3) / f"{image_id}{ext}")
        (root / "train" / f"{image_id}.jpg").unlink()
        paths.append(f"{i % 3}/{image_id}{ext}")
    train.assign(file=paths).to_csv(root / "train.csv", index=False)
    (root / "test" / "a").mkdir()  # the sample's plain ids name files in a subfolder, some of them .png
    for i, test in enumerate(sorted((root / "test").glob("*.jpg"))):
        Image.open(test).save(root / "test" / "a" / (test.stem + (".png" if i % 2 else ".jpg")))
        test.unlink()
    out = tmp_path / "prepared"
    run_prepare(CompetitionConfig(source=str(root), path_column="file"), out)
    data = load_prepared(out)
    assert data.train["path"].tolist() == [f"train/{p}" for p in paths]
    assert data.test["path"].str.startswith("test/a/te").all() and data.test["path"].str.endswith(".png").sum() == 3
    # the images are the files named, not black placeholders
    assert (np.asarray(data.train_images).reshape(len(data.train), -1).max(1) > 0).all()


def test_image_folder_layout_without_csvs(tmp_path):
    root = tmp_path / "comp"
    rng = np.random.default_rng(0)
    for c, label in enumerate(("cat", "dog", "frog")):
        (root / "train" / label / "batch1").mkdir(parents=True)
        for i in range(6):  # one class folder nests its files a level deeper
            folder = root / "train" / label / ("batch1" if i % 2 else "")
            make_image(c, rng).save(folder / f"{label}{i}.{'png' if i % 3 else 'jpg'}")
    (root / "test").mkdir()
    for i in range(4):
        make_image(i % 3, rng).save(root / "test" / f"t{i}.jpg")
    archive = tmp_path / "folders.zip"  # the same inside a zip's top folder, with no folder entries
    with zipfile.ZipFile(archive, "w") as z:
        for path in root.rglob("*.*"):
            z.write(path, f"data/{path.relative_to(root)}")
    for source in (root, archive):
        out = tmp_path / f"prepared-{source.name}"
        summary = run_prepare(
            CompetitionConfig(source=str(source), train_csv=None, sample_submission=None, answers=None), out
        )
        data = load_prepared(out)
        assert data.classes == ["cat", "dog", "frog"] and summary["n_train"] == 18
        assert (data.train.groupby("label").size() == 6).all()
        assert "dog/batch1/dog1.png" in set(data.train["id"])
        assert data.test["id"].tolist() == ["t0.jpg", "t1.jpg", "t2.jpg", "t3.jpg"]
        sample = pd.read_csv(out / "sample_submission.csv")
        assert list(sample.columns) == ["id", "label"] and len(sample) == 4


@pytest.mark.parametrize(
    "column, value", [("id", "../../../etc/passwd"), ("id", "/etc/passwd"), ("file", "../comp2/x.jpg")]
)
def test_an_id_or_path_leaving_the_competition_is_refused(tmp_path, column, value):
    root = write_competition(tmp_path / "comp")
    train = pd.read_csv(root / "train.csv", dtype=str)
    train["file"] = train["id"] + ".jpg"
    train.loc[3, column] = value
    train.to_csv(root / "train.csv", index=False)
    comp = CompetitionConfig(source=str(root), path_column="file" if column == "file" else None)
    with pytest.raises(PipelineError) as info:
        run_prepare(comp, tmp_path / "prepared")
    assert f"row 5: '{value}' leaves the competition folder" in str(info.value)
    assert not (tmp_path / "prepared").exists()


def test_a_zip_member_path_leaving_the_folder_is_refused(tmp_path):
    root = write_competition(tmp_path / "comp")
    sample = pd.read_csv(root / "sample_submission.csv", dtype=str)
    sample.loc[0, "id"] = "../train/tr0000"
    sample.to_csv(root / "sample_submission.csv", index=False)
    archive = tmp_path / "comp.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in root.rglob("*"):
            z.write(path, path.relative_to(root))
    with pytest.raises(PipelineError, match=r"row 2: '\.\./train/tr0000' leaves the competition folder"):
        run_prepare(CompetitionConfig(source=str(archive)), tmp_path / "prepared")


# ---------------------------------------------------------------- bad files, all at once


def _break_three(root):
    (root / "train" / "tr0001.jpg").write_bytes(b"")  # empty
    data = (root / "train" / "tr1001.jpg").read_bytes()
    (root / "train" / "tr1001.jpg").write_bytes(data[: len(data) // 2])  # truncated
    (root / "train" / "tr2002.jpg").unlink()  # missing


def test_every_bad_training_image_is_reported_in_one_error(comp_config, tmp_path):
    _break_three(tmp_path / "comp")
    with pytest.raises(PipelineError) as info:
        run_prepare(comp_config, tmp_path / "prepared")
    message = str(info.value)
    assert message.startswith("3 bad training images") and "\n" not in message
    assert "tr0001.jpg (empty file)" in message
    assert re.search(r"tr1001\.jpg \(cannot decode: OSError: [^)]*[Tt]runcated", message)
    assert "tr2002.jpg or" in message and "(no such image file)" in message
    assert "prepare.skip_bad_images: true" in message


def test_skip_bad_images_drops_and_lists_them(comp_config, tmp_path, capsys):
    _break_three(tmp_path / "comp")
    out = tmp_path / "prepared"
    summary = prepare(comp_config, image_size=8, n_folds=2, seed=0, out_dir=out, workers=1, skip_bad_images=True)
    data = load_prepared(out)
    assert summary["skipped"] == 3 and len(data.train) == 21 == len(data.train_images)
    assert {"tr0001", "tr1001", "tr2002"}.isdisjoint(data.train["id"])
    # the cache rows stayed aligned with train.csv: every kept image is its class's colour
    means = np.asarray(data.train_images).reshape(len(data.train), -1, 3).mean(1)
    assert (means.argmax(1) == np.array([0, 1, 2])[data.train["target"]]).all()
    err = capsys.readouterr().err
    assert "skipped 3 bad training images" in err and "tr0001.jpg (empty file)" in err


def test_a_bad_test_image_is_an_error_even_when_skipping(comp_config, tmp_path):
    (tmp_path / "comp" / "test" / "te001.jpg").write_bytes(b"")
    with pytest.raises(PipelineError, match=r"1 bad test images: .*te001\.jpg \(empty file\)"):
        prepare(
            comp_config, image_size=8, n_folds=2, seed=0, out_dir=tmp_path / "prepared", workers=1, skip_bad_images=True
        )


# ---------------------------------------------------------------- image geometry


def _bands(root: Path) -> None:
    """A 40 x 20 image: green 10 px | red 20 px | blue 10 px, as every training image."""
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :10] = (0, 255, 0)
    img[:, 10:30] = (255, 0, 0)
    img[:, 30:] = (0, 0, 255)
    for path in (root / "train").glob("*.jpg"):
        Image.fromarray(img).save(path.with_suffix(".png"))
        path.unlink()


@pytest.mark.parametrize("resize", ["squash", "pad", "center_crop"])
def test_resize_modes(tmp_path, resize):
    root = write_competition(tmp_path / "comp")
    _bands(root)
    out = tmp_path / "prepared"
    prepare(
        CompetitionConfig(source=str(root)), image_size=16, n_folds=2, seed=0, out_dir=out, workers=1, resize=resize
    )
    data = load_prepared(out)
    img = np.asarray(data.train_images[0]).astype(int)
    assert data.train[["width", "height"]].iloc[0].tolist() == [40, 20]  # the original size is kept
    middle, top = img[8], img[:, 8]
    if resize == "squash":  # all three bands, nothing black
        assert middle[0, 1] > 200 and middle[8, 0] > 200 and middle[15, 2] > 200 and img.max(2).min() > 100
    elif resize == "pad":  # the whole width, black bars above and below (40x20 -> 16x8, 4 px each side)
        assert middle[0, 1] > 200 and middle[15, 2] > 200
        assert top[:3].max() < 30 and top[-3:].max() < 30 and top[5:11, 0].min() > 200
    else:  # the middle 20 x 20: only red
        assert img[..., 0].min() > 200 and img[..., 1:].max() < 60


def test_kappa_needs_integer_grades(comp_config, tmp_path):
    comp = dataclasses.replace(comp_config, metric="quadratic_weighted_kappa")
    with pytest.raises(
        PipelineError,
        match=r"train.csv: label 'cat' is not an integer grade \(competition.metric: "
        r"quadratic_weighted_kappa needs ordinal integer labels\)",
    ):
        run_prepare(comp, tmp_path / "prepared")


def test_train_and_test_images_may_share_one_folder(tmp_path):
    root = write_competition(tmp_path / "comp")
    for path in (root / "test").iterdir():
        path.rename(root / "train" / path.name)
    out = tmp_path / "prepared"
    summary = run_prepare(CompetitionConfig(source=str(root), test_dir="train", max_train_rows=12), out)
    assert (summary["n_train"], summary["n_test"]) == (12, 6)  # the 12 rows left out are not test images


def _worker_handlers(_) -> tuple:
    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)


def test_decoding_workers_die_of_sigterm_whatever_stop_handlers_the_stage_installed(tmp_path):
    """Pool.terminate() ends workers with SIGTERM: a worker that inherited the stage's stop handler could
    swallow it and wait for the queue's lock forever (prepare hung after decoding 10,000 test images)."""
    write_competition(tmp_path / "raw", n_per_class=2, n_test=2)
    previous = stop_on_signals()
    try:
        with uninterrupted():  # a stop signal here only waits: so would a worker forked now
            pool = mp.get_context("fork").Pool(1, cache_module._init_worker, (str(tmp_path / "raw"), ""))
            try:
                handlers = pool.apply(_worker_handlers, (0,))
            finally:
                pool.terminate()
                pool.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert handlers == (signal.SIG_IGN, signal.SIG_DFL)
