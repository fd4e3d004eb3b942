"""The analyze stage: numbers checked against hand computations, sections of the rendered page,
planted weaknesses found, bad OOF files refused, the real MLflow store receiving the report."""

import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline import __main__ as cli
from pipeline.analyze import (
    _epochs,
    _resolution,
    analyze_model,
    confident_wrong_rows,
    diversity,
    expected_calibration_error,
    fold_scores,
    most_confused_pairs,
    next_steps,
    per_class_accuracy,
    per_class_scores,
    reliability_table,
    summary,
    worst_rows,
)
from pipeline.config import CompetitionConfig
from pipeline.data import build_train_transform
from pipeline.prepare import prepare
from pipeline.probs import prediction_frame as probs_frame
from pipeline.report import ReportRows, never_predicted, wrap_caption, write_report
from pipeline.slices import ADVICE, advise, augment_yaml, image_properties, slice_errors
from pipeline.tasks.single_label import METRICS, SingleLabel
from tests.conftest import write_competition

# A hand-made OOF matrix: 6 rows, 3 classes, confidences kept off the bin edges.
PROBS = np.array(
    [
        [0.90, 0.05, 0.05],  # true 0, right, confidence 0.90
        [0.55, 0.35, 0.10],  # true 1, predicted 0, 0.55
        [0.20, 0.70, 0.10],  # true 1, right, 0.70
        [0.50, 0.25, 0.25],  # true 2, predicted 0, 0.50
        [0.10, 0.05, 0.85],  # true 2, right, 0.85
        [0.34, 0.33, 0.33],  # true 0, right, 0.34
    ]
)
Y = np.array([0, 1, 1, 2, 2, 0])
FOLDS = np.array([0, 0, 0, 1, 1, 1])
CLASSES = ["cat", "dog", "frog"]
TASK = SingleLabel(CLASSES)
# 5 bins of width 0.2: (0.2,0.4] {0.34 right}; (0.4,0.6] {0.55 wrong, 0.50 wrong}; (0.6,0.8] {0.70 right};
# (0.8,1] {0.90 right, 0.85 right}
ECE = (1 * abs(1 - 0.34) + 2 * abs(0 - 0.525) + 1 * abs(1 - 0.70) + 2 * abs(1 - 0.875)) / 6
CONFUSION = [[2, 0, 0], [1, 1, 0], [1, 0, 1]]


def test_confusion_counts_and_pairs_match_hand_counts():
    cm = SingleLabel(CLASSES).confusion(PROBS.argmax(1), Y)
    assert cm.tolist() == CONFUSION
    assert most_confused_pairs(cm, 5) == [(1, 0, 1), (2, 0, 1)]  # empty cells are not pairs


def test_ece_and_reliability_match_hand_computation():
    table = reliability_table(PROBS.max(1), PROBS.argmax(1) == Y, n_bins=5)
    assert table["rows"].tolist() == [0, 1, 2, 1, 2]
    np.testing.assert_allclose(table["accuracy"].iloc[1:], [1, 0, 1, 1])
    np.testing.assert_allclose(table["confidence"].iloc[1:], [0.34, 0.525, 0.70, 0.875])
    assert expected_calibration_error(table) == pytest.approx(ECE)
    perfect = np.eye(3)[Y]  # confident and always right: calibrated
    assert expected_calibration_error(reliability_table(perfect.max(1), perfect.argmax(1) == Y, 5)) == 0


def test_fold_scores_and_spread():
    table = fold_scores(PROBS, Y, FOLDS, TASK)
    acc0, acc1 = 2 / 3, 2 / 3
    assert table.loc["0", "accuracy"] == pytest.approx(acc0) and table.loc["1", "rows"] == 3
    log_loss1 = -np.mean(np.log([0.25, 0.85, 0.34]))
    assert table.loc["1", "log_loss"] == pytest.approx(log_loss1)
    assert table.loc["mean", "accuracy"] == pytest.approx((acc0 + acc1) / 2)
    assert table.loc["std", "log_loss"] == pytest.approx(np.std([table.loc["0", "log_loss"], log_loss1], ddof=1))


def test_worst_and_confidently_wrong_rows():
    # losses: -log p(true) = 0.90, 0.35, 0.70, 0.25, 0.85, 0.34 -> worst is row 3 (p=0.25), then 5 (0.34), 1 (0.35)
    assert worst_rows(TASK.row_losses(PROBS, Y), 3).tolist() == [3, 5, 1]
    # only the wrong ones, 0.55 before 0.50
    assert confident_wrong_rows(PROBS.max(1), PROBS.argmax(1) != Y, 5).tolist() == [1, 3]


def test_image_properties_from_pixels():
    grey = np.full((8, 8, 3), 100, np.uint8)
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    edges = np.zeros((8, 8, 3), np.uint8)
    edges[:, ::2] = 255  # stripes: sharp
    blurred = np.asarray(Image.fromarray(edges).filter(__import__("PIL.ImageFilter").ImageFilter.GaussianBlur(1)))
    props = image_properties(np.stack([grey, red, edges, blurred]))
    assert props.loc[0, "brightness"] == pytest.approx(100, abs=1e-3) and props.loc[0, "contrast"] == 0
    assert props.loc[0, "colourfulness"] == 0
    assert props.loc[1, "colourfulness"] == pytest.approx(0.3 * np.hypot(255, 127.5))
    assert props.loc[1, "brightness"] == pytest.approx(0.299 * 255)
    assert props.loc[2, "sharpness"] > 10 * props.loc[3, "sharpness"] > 0
    assert "scale" not in props and "aspect" not in props  # no sizes given
    sized = image_properties(np.stack([grey, grey]), width=np.array([10, 40]), height=np.array([10, 10]))
    assert sized["scale"].tolist() == [10, 20] and sized["aspect"].tolist() == [1, 4]
    same = image_properties(np.stack([grey, grey]), width=np.array([32, 32]), height=np.array([32, 32]))
    assert "scale" not in same  # one size for all: nothing to slice


def _brightness_images(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Grey images of varied brightness with the same noise amplitude (so contrast, colour and
    sharpness do not follow brightness)."""
    level = rng.uniform(30, 225, n)
    noise = rng.integers(-15, 16, size=(n, 16, 16, 3))
    return np.clip(level[:, None, None, None] + noise, 0, 255).astype(np.uint8), level


def test_planted_dark_image_errors_give_brightness_advice():
    rng = np.random.default_rng(0)
    images, level = _brightness_images(600, rng)
    props = image_properties(images)
    dark = np.argsort(level)[:120]
    wrong = np.zeros(600, bool)
    wrong[rng.choice(dark, 60, replace=False)] = True  # every error on the darkest fifth
    slices = slice_errors(wrong, props, n_buckets=5, alpha=0.05)
    advice = advise(slices, augment=[{"RandomCrop": {"height": 16, "width": 16}}])
    assert [(a["property"], a["side"]) for a in advice] == [("brightness", "low")]
    assert "dark images" in advice[0]["text"] and advice[0]["augmentation"] == "RandomBrightnessContrast"
    assert "append to train.augment" in advice[0]["text"] and advice[0]["params"] in advice[0]["text"]
    weak = slices[slices["weak"]].iloc[0]
    assert weak["error_rate"] == pytest.approx(0.5) and weak["ratio"] == pytest.approx(0.5 / 0.1)
    # already augmented that way: the advice says to make it stronger instead
    again = advise(slices, augment=[{"RandomBrightnessContrast": {}}])
    assert "already has RandomBrightnessContrast" in again[0]["text"]


def test_errors_spread_at_random_give_no_advice():
    rng = np.random.default_rng(1)
    images, _ = _brightness_images(600, rng)
    wrong = rng.random(600) < 0.1
    slices = slice_errors(wrong, image_properties(images), n_buckets=5, alpha=0.05)
    assert len(slices) > 0 and not slices["weak"].any()
    assert advise(slices, augment=[]) == []


def test_every_advised_augmentation_is_a_valid_train_augment_entry():
    for (prop, side), rule in ADVICE.items():
        transform = build_train_transform([rule.augment], seed=0, where=f"ADVICE[{prop}, {side}]")
        assert transform(image=np.zeros((16, 16, 3), np.uint8))["image"].shape == (16, 16, 3)
        assert augment_yaml(rule.augment).startswith(f"- {next(iter(rule.augment))}: {{")


def test_diversity_of_a_copy_and_of_a_complement():
    a = PROBS
    c = np.eye(3)[Y] * 0.8 + 0.2 / 3  # always right
    c[[0, 2]] = np.roll(c[[0, 2]], 1, axis=1)  # ...except where a is right
    div = diversity(
        {"a": a.argmax(1), "copy": a.copy().argmax(1), "c": c.argmax(1)}, Y, SingleLabel(CLASSES)
    ).set_index(["a", "b"])
    assert div.loc[("a", "copy"), "disagreement"] == 0
    assert div.loc[("a", "copy"), "error_correlation"] == pytest.approx(1)
    assert div.loc[("a", "copy"), "oracle_accuracy"] == pytest.approx(4 / 6)  # a copy adds nothing
    assert div.loc[("a", "c"), "both_wrong"] == 0 and div.loc[("a", "c"), "oracle_accuracy"] == 1
    per_class = per_class_accuracy({"a": a.argmax(1)}, Y, CLASSES)
    assert per_class["a"].tolist() == [1.0, 0.5, 0.5]


class _Page(HTMLParser):
    """Section ids, images, links and the text of each table (by id) of a page."""

    def __init__(self):
        super().__init__()
        self.ids, self.images, self.refs, self.tables, self._table, self._cell = [], [], [], {}, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "img":
            self.images.append(attrs["src"])
        self.refs += [v for k, v in attrs.items() if k in ("href", "src") and not v.startswith(("#", "data:"))]
        if tag == "table":
            self._table = attrs.get("id")
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append(self._cell)
            self._cell = None
        elif tag == "table":
            self._table = None


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """The report of a tiny synthetic run: two backbones and their ensemble on the hand-made rows. The
    second backbone is named `ensemble`: backbones and the ensemble have separate namespaces."""
    out = tmp_path_factory.mktemp("oof")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    other = np.roll(PROBS, 1, axis=0)
    oof = {"net_a": PROBS, "ensemble": other}
    submitted = (PROBS + other) / 2
    props = image_properties(images)
    analyses = [
        analyze_model(
            m,
            p,
            Y,
            FOLDS,
            TASK,
            props,
            None,
            top_k=4,
            pairs=3,
            calibration_bins=5,
            slice_buckets=2,
            alpha=0.05,
            where="train.augment",
            ensemble=ensemble,
        )
        for m, p, ensemble in [*((m, p, False) for m, p in oof.items()), ("ensemble", submitted, True)]
    ]
    div = diversity({m: p.argmax(1) for m, p in oof.items()}, Y, SingleLabel(CLASSES))
    write_report(
        out,
        analyses,
        div,
        per_class_accuracy({a.label: a.pred for a in analyses}, Y, CLASSES),
        summary(analyses, div),
        ReportRows(np.array([f"img{i}" for i in range(6)]), Y, FOLDS, CLASSES, images, SingleLabel(CLASSES)),
        2,
        "test report",
    )
    page = _Page()
    page.feed((out / "index.html").read_text())
    return out, page


def test_report_has_every_section_for_every_model(rendered):
    _, page = rendered
    assert "side-by-side" in page.ids and "side-by-side-diversity" in page.ids
    for m in ("backbone-net_a", "backbone-ensemble", "ensemble"):
        for section in ("scores", "confusion", "worst", "confident-wrong", "calibration", "slices"):
            assert f"{m}-{section}" in page.ids, f"{m}-{section} missing"
    assert page.refs == []  # self-contained: nothing fetched from elsewhere
    assert len(page.images) >= 3 * 6
    for src in page.images:  # every figure is an embedded, decodable PNG
        assert src.startswith("data:image/png;base64,")
        assert Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).format == "PNG"


def test_report_numbers_match_hand_computations(rendered):
    out, page = rendered
    rows = page.tables["backbone-net_a-confusion-table"]
    assert [[int(v) for v in r[1:]] for r in rows[1:]] == CONFUSION
    html = (out / "index.html").read_text()
    section = html[html.index('id="backbone-net_a-calibration"') :]
    assert re.search(r'class="ece">([0-9.]+)<', section).group(1) == f"{ECE:.4f}"
    overall = dict(zip(page.tables["backbone-net_a-overall"][0], page.tables["backbone-net_a-overall"][1]))
    assert float(overall["accuracy"]) == pytest.approx(4 / 6, abs=1e-4)
    worst = page.tables["backbone-net_a-worst-table"]
    assert [r[0] for r in worst[1:]] == ["img3", "img5", "img1", "img2"]
    assert [r[0] for r in page.tables["backbone-net_a-confident-wrong-table"][1:]] == ["img1", "img3"]
    pairs = page.tables["backbone-net_a-pairs"]
    assert pairs[1][:3] == ["dog", "cat", "1"] and pairs[1][4] == "img1"
    per_class = {r[0]: r for r in page.tables["backbone-net_a-per-class"][1:]}
    assert float(per_class["dog"][2]) == pytest.approx(0.5)  # recall of dog: 1 of 2


def test_report_files_for_dvc_and_mlflow(rendered):
    out, _ = rendered
    import json

    headline = json.loads((out / "summary.json").read_text())
    net_a = headline["backbones"]["net_a"]
    assert net_a["ece"] == pytest.approx(ECE) and net_a["accuracy"] == pytest.approx(4 / 6)
    assert "net_a~ensemble" in headline["pairs"]
    # the backbone named `ensemble` and the ensemble are both there, each with its own numbers
    assert headline["backbones"]["ensemble"]["log_loss"] != pytest.approx(headline["ensemble"]["log_loss"])
    for folder in ("backbones/net_a", "backbones/ensemble", "ensemble"):
        for fig in ("confusion", "worst", "confident-wrong", "reliability", "confidence", "slices"):
            assert (out / "figures" / folder / f"{fig}.png").is_file()
    assert (out / "figures" / "side_by_side" / "per_class.png").is_file()
    analysis = json.loads((out / "analysis.json").read_text())
    assert set(analysis) == {"backbones", "ensemble", "side_by_side"} and set(analysis["backbones"]) == {
        "net_a",
        "ensemble",
    }
    predictions = pd.read_csv(out / "tables/backbones/net_a/predictions.csv", dtype={"actual": str, "predicted": str})
    assert pd.crosstab(predictions["actual"], predictions["predicted"]).loc["frog", "cat"] == 1


# ---------------------------------------------------------------- the stage through its CLI


@pytest.fixture
def stage_dir(tmp_path, monkeypatch):
    """A working directory with prepared data and OOF files of two backbones and the ensemble."""
    comp = write_competition(tmp_path / "raw" / "comp", n_per_class=6, n_test=3)
    prepare(
        CompetitionConfig(source=str(comp)),
        image_size=8,
        n_folds=2,
        seed=0,
        out_dir=tmp_path / "data/prepared",
        workers=1,
    )
    train = pd.read_csv(tmp_path / "data/prepared/train.csv", dtype={"id": str})
    rng = np.random.default_rng(0)
    for _name, path in (
        ("net_a", "predictions/net_a/oof_probs.csv"),
        ("net_b", "predictions/net_b/oof_probs.csv"),
        ("ensemble", "submissions/oof_probs.csv"),
    ):
        probs = rng.dirichlet(np.ones(3), size=len(train))
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        probs_frame(train["id"], probs, ["cat", "dog", "frog"]).to_csv(tmp_path / path, index=False)
    (tmp_path / "params.yaml").write_text(
        "train:\n  backbones: {net_a: {}, net_b: {augment: [{RandomBrightnessContrast: {}}]}}\n"
        "analyze: {top_k: 4, slice_buckets: 2}\n"
        "tracking: {experiment: analyze-test}\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    return tmp_path


def test_stage_writes_the_report_and_logs_it_to_mlflow(stage_dir):
    assert cli.main(["analyze"]) == 0
    assert (stage_dir / "reports/oof/index.html").is_file()
    client = MlflowClient(f"sqlite:///{stage_dir}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("analyze-test").experiment_id])[0]
    assert run.info.run_name == "analyze" and "ensemble.ece" in run.data.metrics
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "oof")}
    assert {"oof/index.html", "oof/summary.json", "oof/figures"} <= logged


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", r"net_b: predictions/net_b/oof_probs.csv not found"),
        ("ids", r"net_b: predictions/net_b/oof_probs.csv row 3: id 'intruder' where the prepared data has '"),
        ("short", r"net_b: predictions/net_b/oof_probs.csv row \d+: no row where the prepared data has"),
        ("sum", r"net_b: predictions/net_b/oof_probs.csv row 4: probabilities sum to 1.5, not 1"),
        ("cut", r"net_b: predictions/net_b/oof_probs.csv row \d+, column '\w+': '' is not a number"),
        ("binary", r"net_b: predictions/net_b/oof_probs.csv is not a readable CSV \("),
    ],
)
def test_bad_oof_files_fail_with_one_line_and_keep_the_old_report(stage_dir, capsys, damage, message):
    params = stage_dir / "params.yaml"
    params.write_text(params.read_text().replace("experiment: analyze-test", "enabled: false"))
    assert cli.main(["analyze"]) == 0
    before = (stage_dir / "reports/oof/index.html").read_bytes()
    path = stage_dir / "predictions/net_b/oof_probs.csv"
    frame = pd.read_csv(path, dtype={"id": str})
    if damage == "missing":
        path.unlink()
    elif damage == "ids":
        frame.loc[1, "id"] = "intruder"
        frame.to_csv(path, index=False)
    elif damage == "short":
        frame.iloc[:-1].to_csv(path, index=False)
    elif damage == "cut":  # an interrupted copy: the last row ends in the middle
        text = path.read_text()
        path.write_text(text[: text.rstrip().rfind(",") + 1])
    elif damage == "binary":
        path.write_bytes(b"id,cat\n" + bytes(range(256)) * 4)
    else:
        frame.loc[2, "cat"] += 0.5
        frame.to_csv(path, index=False)
    capsys.readouterr()
    assert cli.main(["analyze"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(f"error: {message}", err[0]), err
    assert (stage_dir / "reports/oof/index.html").read_bytes() == before
    assert not list((stage_dir / "reports").glob("oof.*"))  # no scratch folder left behind


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_report_opens_in_headless_chromium(rendered, tmp_path):
    out, _ = rendered
    proc = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path}/profile",
            "--dump-dom",
            (out / "index.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for section in ("side-by-side", "ensemble-calibration", "backbone-net_a-slices"):
        assert f'id="{section}"' in proc.stdout


def test_a_class_never_predicted_is_flagged():
    y = np.array([0, 0, 0, 1, 1, 2])
    probs = np.eye(3)[[0, 0, 1, 1, 1, 0]]  # class 2 has a row but is never the argmax
    table = per_class_scores(probs, probs.argmax(1), y, SingleLabel(["a", "b", "c"]))
    assert table["predicted"].tolist() == [3, 3, 0]
    assert never_predicted(table) == ["c"]
    assert never_predicted(per_class_scores(np.eye(3)[y], y, y, SingleLabel(["a", "b", "c"]))) == []


def test_the_competition_metric_heads_a_models_scores():
    props = image_properties(np.random.default_rng(0).integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8))
    kwargs = dict(top_k=4, pairs=3, calibration_bins=5, slice_buckets=2, alpha=0.05, where="train.augment")
    for metric in ("roc_auc", "macro_f1"):
        a = analyze_model("m", PROBS, Y, FOLDS, TASK, props, None, metric=metric, **kwargs)
        assert list(a.scores)[0] == metric and set(a.scores) == set(METRICS) - {"quadratic_weighted_kappa"}
        assert (
            list(summary([a], diversity({"m": PROBS.argmax(1)}, Y, SingleLabel(CLASSES)))["backbones"]["m"])[0]
            == metric
        )


# ---------------------------------------------------------------- what to try next


def _made_oof(top: float):
    """30 rows of boot / dress / shirt: every boot right, 3 dresses taken for shirts, 1 shirt for a boot;
    every row's top probability `top` (accuracy 26/30 against it)."""
    y = np.repeat([0, 1, 2], 10)
    pred = y.copy()
    pred[[10, 11, 12]] = 2
    pred[20] = 0
    probs = np.full((30, 3), (1 - top) / 2)
    probs[np.arange(30), pred] = top
    return probs, y


def _analysis(probs, y, task):
    images = np.random.default_rng(0).integers(0, 256, size=(len(y), 8, 8, 3), dtype=np.uint8)
    kwargs = dict(top_k=4, pairs=3, calibration_bins=5, slice_buckets=2, alpha=0.05, where="train.augment")
    return analyze_model("m", probs, y, np.arange(len(y)) % 3, task, image_properties(images), None, **kwargs)


@pytest.mark.parametrize("top, direction", [(0.6, "under-confident"), (0.99, "over-confident")])
def test_top_lines_state_the_weakest_class_the_top_confusion_and_the_calibration(top, direction):
    probs, y = _made_oof(top)
    task = SingleLabel(["boot", "dress", "shirt"])
    a = _analysis(probs, y, task)
    assert not a.advice  # no weak slice: the top lines are there all the same
    steps = {s["kind"]: s for s in next_steps(a, task, label_smoothing=0.1)}
    pred = probs.argmax(1)
    recall = {c: (pred[y == i] == i).mean() for i, c in enumerate(task.classes)}
    weakest = min(recall, key=recall.get)
    assert (steps["weakest"]["class"], steps["weakest"]["recall"]) == (weakest, pytest.approx(recall[weakest]))
    assert "Weakest class: dress, recall 0.70 of 10 rows" in steps["weakest"]["text"]
    share = ((y == 1) & (pred == 2)).sum() / (y == 1).sum()
    assert (steps["confusion"]["true"], steps["confusion"]["predicted"]) == ("dress", "shirt")
    assert (
        steps["confusion"]["share"] == pytest.approx(share) and "3 of 10 dress rows (30%)" in steps["confusion"]["text"]
    )
    gap = (pred == y).mean() - probs.max(1).mean()
    assert steps["calibration"]["direction"] == direction and steps["calibration"]["gap"] == pytest.approx(gap)
    if direction == "under-confident":
        assert "lower train.label_smoothing (now 0.1)" in steps["calibration"]["text"]


def test_the_page_opens_with_the_top_lines(tmp_path):
    probs, y = _made_oof(0.6)
    task = SingleLabel(["boot", "dress", "shirt"])
    a, e = _analysis(probs, y, task), _analysis(probs, y, task)
    e.ensemble = True
    curves = {str(k): [{"epoch": i + 1, "train_loss": 1.0 / (i + 1), "val_log_loss": 1.0 / (i + 1)} for i in range(5)]
              for k in range(3)}  # fmt: skip
    a.next_steps = next_steps(a, task, {"curves": curves, "monitor": "log_loss", "input_size": 96}, 200.0, 0.1)
    e.next_steps = next_steps(e, task, label_smoothing=0.1)
    images = np.zeros((30, 8, 8, 3), dtype=np.uint8)
    rows = ReportRows(np.array([f"r{i}" for i in range(30)]), y, np.arange(30) % 3, task.classes, images, task)
    write_report(tmp_path, [a, e], pd.DataFrame(), per_class_accuracy({}, y, task.classes), {}, rows, 2, "t")
    html = (tmp_path / "index.html").read_text()
    top = html[html.index('<section id="next">') : html.index('<section id="side-by-side">')]
    assert "Weakest class: dress" in top and "Under-confident" in top and "m: Epochs:" in top
    assert "m: Resolution: the network sees 96 px of images of 200 px" in top
    assert "quadratic_weighted_kappa" not in html  # class names have no order: no kappa anywhere


def test_the_epochs_line_reads_the_fold_curves():
    def report(curve):
        return {"curves": {str(k): c for k, c in enumerate(curve)}, "monitor": "accuracy", "input_size": 64}

    def fold(scores, every=1):
        return [{"epoch": i + 1, **({"val_accuracy": s} if (i + 1) % every == 0 else {})} for i, s in enumerate(scores)]

    rising, peaked = [0.5, 0.6, 0.7, 0.8], [0.5, 0.9, 0.7, 0.6]
    more = _epochs(report([fold(rising), fold(rising), fold(peaked)]))
    assert more["verdict"] == "more" and more["folds_best_last"] == 2
    enough = _epochs(report([fold(peaked), fold(peaked), fold(rising)]))
    assert enough["verdict"] == "enough" and "peaked at epochs 2, 2, 4 of 4" in enough["text"]
    assert _epochs(report([fold(rising, every=4)] * 3))["verdict"] == "unknown"  # one validation: no curve
    assert _resolution(96, 100.0)["verdict"] == "enough" and _resolution(96, 200.0)["verdict"] == "higher"


def test_kappa_only_for_ordered_labels():
    assert "quadratic_weighted_kappa" not in SingleLabel(["cat", "dog"]).METRICS
    assert "quadratic_weighted_kappa" in SingleLabel(["0", "1", "2"]).METRICS
    from pipeline.config import ConfigError, parse_params
    from pipeline.tasks import check_params

    params = parse_params({"competition": {"metric": "quadratic_weighted_kappa"}})
    with pytest.raises(ConfigError, match="quadratic_weighted_kappa needs ordered labels, integer grades"):
        check_params(params, SingleLabel(["cat", "dog"]), "train")
    check_params(params, SingleLabel(["0", "1"]), "train")


def test_captions_are_whole_wrapped_to_the_tile():
    caption = "img42\ndress -> t-shirt (0.93)"
    lines = wrap_caption(caption, lambda line: len(line) <= 10)
    assert all(len(line) <= 10 for line in lines) and "~" not in "".join(lines)
    assert " ".join(lines).replace(" ", "") == caption.replace("\n", "").replace(" ", "")
    assert wrap_caption("averyveryverylongname", lambda line: len(line) <= 8) == ["averyver", "yverylon", "gname"]
