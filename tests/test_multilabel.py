"""Multi-label competitions: reading both layouts, folds, metrics, the fitted last steps (thresholds,
temperature), the honest chain, bad input, and the real stages end to end on tiny timm models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from sklearn.metrics import f1_score, fbeta_score, log_loss, roc_auc_score

from pipeline.__main__ import main as cli_main
from pipeline.config import parse_params
from pipeline.data import load_prepared
from pipeline.ensemble import chain_crossfit, fit_methods
from pipeline.errors import PipelineError
from pipeline.postprocess import GRID, Temperature, Thresholds, choose_step, decision_score
from pipeline.prepare import prepare, render_digit_mosaics
from pipeline.submission import SubmissionFormat
from pipeline.tasks.multilabel import METRICS, MultiLabel, rescale
from pipeline.tasks.single_label import SingleLabel
from tests.conftest import PALETTE

ROOT = Path(__file__).resolve().parents[1]
COLOURS = ["red", "green", "blue", "yellow"]


def write_multilabel_competition(root: Path, layout: str, n_train: int = 40, n_test: int = 8, seed: int = 0) -> Path:
    """12x12 images of 2x2 tiles, each tile one colour of PALETTE or black (never all black), tagged with
    the colours shown: `id,tags` (space-separated) or one 0/1 column per colour."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    rows = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rows[split] = []
        for i in range(n):
            tiles = rng.integers(-1, len(COLOURS), 4)
            tiles[rng.integers(4)] = rng.integers(len(COLOURS))
            img = np.zeros((12, 12, 3), dtype=np.uint8)
            for t, c in enumerate(tiles):
                if c >= 0:
                    r, col = divmod(t, 2)
                    img[6 * r : 6 * r + 6, 6 * col : 6 * col + 6] = PALETTE[c]
            image_id = f"{split}{i:03d}"
            Image.fromarray(img).save(root / split / f"{image_id}.png")
            rows[split].append((image_id, sorted({COLOURS[c] for c in tiles if c >= 0})))
    ids = [i for i, _ in rows["train"]]
    test_ids = [i for i, _ in rows["test"]]
    if layout == "tags":
        pd.DataFrame({"image_name": ids, "tags": [" ".join(t) for _, t in rows["train"]]}).to_csv(
            root / "train.csv", index=False
        )
        pd.DataFrame({"image_name": test_ids, "tags": "red"}).to_csv(root / "sample_submission.csv", index=False)
    else:
        hot = pd.DataFrame([[int(c in t) for c in COLOURS] for _, t in rows["train"]], columns=COLOURS)
        hot.insert(0, "image_name", ids)
        hot.to_csv(root / "train.csv", index=False)
        sample = pd.DataFrame(0.5, index=range(n_test), columns=COLOURS)
        sample.insert(0, "image_name", test_ids)
        sample.to_csv(root / "sample_submission.csv", index=False)
    return root


def _comp(source, **extra):
    raw = {"source": str(source), "id_column": "image_name", "image_ext": ".png", "metric": "f_beta", **extra}
    return parse_params({"competition": raw}).competition


# ---------------------------------------------------------------- reading the target


@pytest.mark.parametrize("layout", ["tags", "columns"])
def test_both_layouts_read_as_multilabel_with_the_labels_of_each_row(tmp_path, layout, capsys):
    src = write_multilabel_competition(tmp_path / "c", layout)
    comp = _comp(src, **({"label_column": "tags"} if layout == "tags" else {}))
    prepare(comp, 12, 3, 0, tmp_path / "prep")
    assert "task: multilabel (auto:" in capsys.readouterr().out
    data = load_prepared(tmp_path / "prep")
    raw = pd.read_csv(src / "train.csv", keep_default_na=False)
    if layout == "tags":
        expected = np.array([[c in t.split() for c in data.classes] for t in raw["tags"]], dtype=float)
    else:
        expected = raw[data.classes].to_numpy(dtype=float)
    assert data.task.name == "multilabel" and sorted(data.classes) == sorted(COLOURS)
    assert np.array_equal(data.targets, expected)
    assert (data.targets.sum(1) > 1).any()  # several labels per image, not one class per combination


def test_integer_classes_stay_single_label_and_one_hot_columns_are_single_label(tmp_path):
    src = write_multilabel_competition(tmp_path / "c", "columns")
    train = pd.read_csv(src / "train.csv")
    first = np.arange(len(train)) % 4
    one_hot = pd.DataFrame(np.eye(4, dtype=int)[first], columns=COLOURS)
    one_hot.insert(0, "image_name", train["image_name"])
    one_hot.to_csv(src / "train.csv", index=False)
    prepare(_comp(src, metric="accuracy"), 12, 2, 0, tmp_path / "prep")
    data = load_prepared(tmp_path / "prep")
    assert data.task.name == "single_label"
    assert [data.classes[t] for t in data.targets] == [COLOURS[i] for i in first]
    digits = pd.DataFrame({"image_name": train["image_name"], "grade": first})
    digits.to_csv(src / "train.csv", index=False)
    sample = pd.read_csv(src / "sample_submission.csv")[["image_name"]].assign(grade=0)
    sample.to_csv(src / "sample_submission.csv", index=False)
    prepare(_comp(src, metric="accuracy", label_column="grade"), 12, 2, 0, tmp_path / "prep2")
    assert load_prepared(tmp_path / "prep2").task.name == "single_label"


def test_every_label_is_in_every_folds_validation_part_where_its_count_allows(tmp_path):
    src = render_digit_mosaics(tmp_path / "mosaic", "tags", n_train=300, n_test=20)
    prepare(_comp(src, label_column="tags", id_column="id"), 16, 5, 0, tmp_path / "prep")
    data = load_prepared(tmp_path / "prep")
    per_fold = np.stack([data.targets[data.folds == k].sum(0) for k in range(5)])
    total = data.targets.sum(0)
    assert (per_fold[:, total >= 5] >= 1).all()
    # iterative stratification: each fold holds close to a fifth of each label
    assert np.abs(per_fold - total / 5).max() <= 0.1 * total.max()


def test_groups_stay_whole_in_multilabel_folds(tmp_path):
    task = MultiLabel(COLOURS)
    rng = np.random.default_rng(0)
    y = (rng.random((200, 4)) < 0.4).astype(float)
    groups = np.repeat(np.arange(50), 4)
    fold = np.full(200, -1)
    for k, (_, val) in enumerate(task.split(y, 5, 0, groups)):
        fold[val] = k
    assert (fold >= 0).all()
    assert all(len(set(fold[groups == g])) == 1 for g in range(50))
    counts = np.stack([y[fold == k].sum(0) for k in range(5)])
    assert (counts > 0).all()


# ---------------------------------------------------------------- metrics


def test_each_multilabel_metric_equals_scikit_learns():
    rng = np.random.default_rng(1)
    y = (rng.random((60, 5)) < 0.35).astype(int)
    y[0] = 0  # an image without labels
    probs = np.clip(0.4 * y + rng.random((60, 5)) * 0.7, 0, 1)
    pred = (probs >= 0.5).astype(int)
    auc = np.mean([roc_auc_score(y[:, c], probs[:, c]) for c in range(5)])
    expected = {
        "f_beta": fbeta_score(y, pred, beta=1.0, average="samples", zero_division=1.0),
        "micro_f1": f1_score(y, pred, average="micro"),
        "macro_f1": f1_score(y, pred, average="macro", zero_division=0.0),
        "mean_column_auc": auc,
        "log_loss": np.mean([log_loss(y[:, c], probs[:, c], labels=[0, 1]) for c in range(5)]),
    }
    for name, (fn, _) in METRICS.items():
        assert fn(probs, y) == pytest.approx(expected[name], abs=1e-9), name
    f2 = MultiLabel([str(c) for c in range(5)], beta=2.0).bind("f_beta")(probs, y)
    assert f2 == pytest.approx(fbeta_score(y, pred, beta=2.0, average="samples", zero_division=1.0))
    assert f2 != pytest.approx(expected["f_beta"], abs=1e-3)
    # float32 probabilities that saturate at 1.0 on a negative label: a large loss, not nan (the epoch choice's)
    saturated = np.array([[1.0, 0.0], [0.2, 0.9]], dtype=np.float32)
    assert 5 < METRICS["log_loss"][0](saturated, np.array([[0, 0], [0, 1]])) < 20
    for name in ("f_beta", "micro_f1", "macro_f1"):  # the threshold search's fast scores
        assert decision_score(name, 1.0, pred, y) == pytest.approx(expected[name], abs=1e-12)


# ---------------------------------------------------------------- fitted last steps


def test_thresholds_on_a_hand_made_oof_matrix_are_the_ones_computed_here():
    # label 0's positives lie in [0.30, 0.40), its negatives below 0.30; label 1's positives >= 0.70 and
    # its negatives in [0.55, 0.65): the best threshold of label 0 is 0.30, of label 1 is 0.66 or above
    rng = np.random.default_rng(2)
    y = (rng.random((400, 2)) < 0.5).astype(float)
    p0 = np.where(y[:, 0] > 0, rng.uniform(0.30, 0.40, 400), rng.uniform(0.0, 0.29, 400))
    p1 = np.where(y[:, 1] > 0, rng.uniform(0.70, 0.95, 400), rng.uniform(0.55, 0.65, 400))
    probs = np.stack([p0, p1], 1)
    task = MultiLabel(["a", "b"])
    step = Thresholds(task, "macro_f1", per_label=True, at_least_one=False).fit(probs, y)
    # computed here: each label's F1 at every grid threshold, the first best kept
    expected = []
    for c in range(2):
        f1 = [f1_score(y[:, c], probs[:, c] >= t) for t in GRID]
        expected.append(GRID[int(np.argmax(f1))])
    assert step.thresholds == pytest.approx(expected)
    assert expected[0] == pytest.approx(0.30) and 0.66 <= expected[1] <= 0.70
    decided = step.transform(probs) >= 0.5
    assert (decided == (y > 0)).all()  # every decision right after the fitted thresholds
    assert ((probs >= 0.5) != (y > 0)).any()  # and not before


def test_at_least_one_label_gives_an_empty_image_its_most_likely_label():
    probs = np.array([[0.1, 0.3, 0.2], [0.9, 0.1, 0.1]])
    out = rescale(probs, np.array([0.5, 0.5, 0.5]), at_least_one=True)
    assert (out >= 0.5).tolist() == [[False, True, False], [True, False, False]]
    assert (rescale(probs, 0.5, at_least_one=False) >= 0.5).sum() == 1


@pytest.mark.parametrize("task_name", ["single_label", "multilabel"])
def test_a_temperature_lowers_the_log_loss_of_a_miscalibrated_matrix(task_name):
    rng = np.random.default_rng(3)
    n, c = 500, 4
    logits = rng.normal(0, 1.5, (n, c))  # targets drawn from these logits: calibrated, then made over-confident
    if task_name == "single_label":
        task = SingleLabel(list("abcd"))
        true = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        y = np.array([rng.choice(c, p=row) for row in true])
        z = 4.0 * logits  # over-confident: logits four times too large
        probs = np.exp(z - z.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
    else:
        task = MultiLabel(list("abcd"))
        y = (rng.random((n, c)) < 1 / (1 + np.exp(-logits))).astype(float)
        probs = 1 / (1 + np.exp(-4.0 * logits))
    loss = task.bind("log_loss")
    step = Temperature(task).fit(probs, y)
    assert step.t > 2.0  # undoes most of the factor 4
    assert loss(step.transform(probs), y) < loss(probs, y) - 0.05
    chosen, scores, _ = choose_step(task, "log_loss", probs, y, np.arange(n) % 5)
    assert chosen.name == "temperature" and scores["temperature"] < scores["identity"]


def test_the_honest_chain_scores_below_the_in_sample_fit_where_the_chain_overfits():
    # eight members of pure noise and few rows: stacking's per-label meta-models and the temperature fit the
    # noise; scored on the rows they were fitted on they beat the base rate, cross-fitted they do not
    rng = np.random.default_rng(4)
    n, c = 120, 3
    y = (rng.random((n, c)) < 0.3).astype(float)
    members = [rng.random((n, c)) for _ in range(8)]
    folds = np.arange(n) % 4
    task = MultiLabel([str(i) for i in range(c)])
    loss = task.bind("log_loss")
    fits, _ = fit_methods(["stacking"], "log_loss", [1.0] * 8, list("abcdefgh"), members, members, y, folds, task)
    in_sample = loss(fits["stacking"].step.transform(fits["stacking"].model.predict_proba(members)), y)
    policies = [{"none": m, "other": rng.random((n, c))} for m in members]
    honest = chain_crossfit(["stacking"], "auto", "log_loss", [1.0] * 8, policies, ["log_loss"] * 8, y, folds, task)
    assert loss(honest, y) > in_sample + 0.02


# ---------------------------------------------------------------- bad input


def _prepare_error(tmp_path, src, **extra) -> str:
    with pytest.raises(PipelineError) as err:
        prepare(_comp(src, **extra), 12, 2, 0, tmp_path / "prep")
    assert not (tmp_path / "prep").exists()  # nothing written
    assert "\n" not in str(err.value)
    return str(err.value)


def test_a_tag_the_samples_probability_columns_lack_is_named(tmp_path):
    src = write_multilabel_competition(tmp_path / "c", "columns")
    sample = pd.read_csv(src / "sample_submission.csv").drop(columns=["yellow"])
    sample.to_csv(src / "sample_submission.csv", index=False)
    assert "label 'yellow' of train.csv has no column" in _prepare_error(tmp_path, src)


def test_an_empty_tag_list_is_refused_unless_allowed(tmp_path):
    src = write_multilabel_competition(tmp_path / "c", "tags")
    train = pd.read_csv(src / "train.csv", keep_default_na=False)
    train.loc[3, "tags"] = ""
    train.to_csv(src / "train.csv", index=False)
    message = _prepare_error(tmp_path, src, label_column="tags")
    assert "row 5: empty label" in message and "competition.empty_labels: true" in message
    prepare(_comp(src, label_column="tags", empty_labels=True, task="multilabel"), 12, 2, 0, tmp_path / "ok")
    assert load_prepared(tmp_path / "ok").targets[3].sum() == 0


@pytest.mark.parametrize("value", ["2", ""])
def test_a_01_column_holding_another_value_names_its_row_and_column(tmp_path, value):
    src = write_multilabel_competition(tmp_path / "c", "columns")
    train = pd.read_csv(src / "train.csv", dtype=str, keep_default_na=False)
    train.loc[6, "blue"] = value
    train.to_csv(src / "train.csv", index=False)
    message = _prepare_error(tmp_path, src, label_column=COLOURS)
    assert f"row 8, column 'blue': '{value}' is not 0 or 1" in message


def test_a_metric_of_the_other_task_is_named(tmp_path):
    src = write_multilabel_competition(tmp_path / "c", "tags")
    assert "competition.metric: accuracy is not a multilabel metric" in _prepare_error(
        tmp_path, src, label_column="tags", metric="accuracy"
    )
    single = write_multilabel_competition(tmp_path / "s", "columns")
    train = pd.read_csv(single / "train.csv")
    pd.DataFrame({"image_name": train["image_name"], "label": np.arange(len(train)) % 2}).to_csv(
        single / "train.csv", index=False
    )
    pd.read_csv(single / "sample_submission.csv")[["image_name"]].assign(label=0).to_csv(
        single / "sample_submission.csv", index=False
    )
    assert "competition.metric: f_beta is not a single_label metric" in _prepare_error(tmp_path, single)


def test_a_label_column_read_two_ways_lists_both_and_the_key(tmp_path):
    src = write_multilabel_competition(tmp_path / "c", "tags")
    train = pd.read_csv(src / "train.csv")
    train["tags"] = [f"species {i % 2} x{i % 3}" if i % 2 else f"genus {i % 3}" for i in range(len(train))]
    train.to_csv(src / "train.csv", index=False)
    message = _prepare_error(tmp_path, src, label_column="tags", metric="accuracy")
    assert "reads two ways: single-label" in message and "multi-label" in message
    assert "set competition.task: single_label or multilabel" in message


def test_a_method_or_metric_not_defined_for_the_task_is_a_config_error_naming_those_that_are():
    from pipeline.config import ConfigError
    from pipeline.ensemble import fit_stage
    from pipeline.tasks import check_params

    params = parse_params(
        {
            "competition": {"metric": "f_beta"},
            "train": {"monitor": "log_loss"},
            "tta": {"metric": "log_loss"},
            "ensemble": {"methods": ["soft_voting", "hard_voting"]},
        }
    )

    class Data:
        task = MultiLabel(COLOURS)
        targets = None

    with pytest.raises(ConfigError, match="hard_voting is not defined for a multilabel task .defined: soft_voting"):
        fit_stage(params, Data(), Path("nowhere"), "params.yaml")
    with pytest.raises(ConfigError, match="train.monitor: accuracy is not a multilabel metric"):
        check_params(params, MultiLabel(COLOURS), "params.yaml", monitor="accuracy")
    check_params(parse_params({}), SingleLabel(COLOURS), "params.yaml")  # the digits defaults pass


# ---------------------------------------------------------------- the real stages


def test_the_columns_layout_is_written_back_as_the_samples_probability_columns(tmp_path):
    src = write_multilabel_competition(tmp_path / "c", "columns")
    prepare(_comp(src, metric="mean_column_auc"), 12, 2, 0, tmp_path / "prep")
    data = load_prepared(tmp_path / "prep", images=False)
    sample = pd.read_csv(tmp_path / "prep" / "sample_submission.csv", dtype=str)
    fmt = SubmissionFormat(**json.loads((tmp_path / "prep" / "submission_format.json").read_text()))
    probs = np.random.default_rng(5).random((len(data.test), len(data.classes)))
    sub = data.task.submission(data.test["id"].tolist(), probs, fmt)
    data.task.check_submission(sub, sample, fmt)
    assert fmt.kind == "probabilities" and list(sub.columns) == list(sample.columns)
    for c in COLOURS:  # each column holds its own label's probabilities, in the sample's order
        assert np.allclose(sub[c].to_numpy(), probs[:, data.classes.index(c)])
    bad = sub.assign(red=1.5)
    with pytest.raises(PipelineError, match="must lie in"):
        data.task.check_submission(bad, sample, fmt)


def _run(args, cwd, env):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """The real stages (prepare .. analyze, then the bundle) on a tiny multi-label competition in Planet's
    layout (RANZCR's, one column per label, is read by the tests above and written back by the next one;
    `make run PRESET=multilabel-columns` runs it through every stage and the bundle)."""
    layout = "tags"
    repo = tmp_path_factory.mktemp(f"ml-{layout}")
    shutil.copy(ROOT / "params.yaml", repo)
    shutil.copytree(ROOT / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    write_multilabel_competition(repo / "comp", layout, n_train=48, n_test=8)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["competition"].update(
        source="comp",
        id_column="image_name",
        image_ext=".png",
        metric="f_beta" if layout == "tags" else "mean_column_auc",
        **({"label_column": "tags"} if layout == "tags" else {}),
    )
    params["prepare"].update(image_size=12, workers=1)
    params["cv"]["n_folds"] = 2
    params["train"].update(
        backbones={"test_resnet": {}}, epochs=2, batch_size=8, lr=0.01, mixup_alpha=0.2, monitor="log_loss"
    )
    params["tta"].update(select="auto", candidates=["none", "hflip"], metric="log_loss")
    params["ensemble"]["methods"] = ["soft_voting", "caruana", "optimized", "stacking"]
    params["tracking"] = {"enabled": False}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    stages = [["prepare"], ["tune", "--backbone", "test_resnet"], ["plan"], ["train", "--backbone", "test_resnet"]]
    stages += [["predict", "--backbone", "test_resnet"], ["ensemble"], ["analyze"], ["bundle"]]
    here = os.getcwd()
    os.chdir(repo)  # the stages' doors, in this process (each as `python -m pipeline <stage>` runs it), from the repo
    try:
        for stage in stages:
            assert cli_main(stage) == 0, stage
    finally:
        os.chdir(here)
    return layout, repo, env


@pytest.mark.training
@pytest.mark.not_isa  # its subject is the files the stages and the bundle write, not float results
def test_the_stages_write_a_valid_multilabel_submission_and_the_bundle_reproduces_it(staged):
    layout, repo, env = staged
    sub = pd.read_csv(repo / "submissions" / "submission.csv", dtype=str, keep_default_na=False)
    sample = pd.read_csv(repo / "comp" / "sample_submission.csv", dtype=str)
    assert list(sub.columns) == list(sample.columns) and sub["image_name"].tolist() == sample["image_name"].tolist()
    if layout == "tags":
        assert all(set(v.split()) <= set(COLOURS) for v in sub["tags"])
        assert any(len(v.split()) > 1 for v in sub["tags"])
    else:
        values = sub[COLOURS].astype(float).to_numpy()
        assert ((values >= 0) & (values <= 1)).all() and not np.allclose(values.sum(1), 1.0)
    out = repo / "bundle_sub.csv"
    probs = repo / "bundle_probs.csv"
    _run(
        [sys.executable, "bundle/predict.py", "--test-dir", "comp/test", "--sample", "comp/sample_submission.csv",
         "--out", str(out), "--probs", str(probs)],
        repo, env,
    )  # fmt: skip
    again = pd.read_csv(out, dtype=str, keep_default_na=False)
    if layout == "tags":
        assert again.equals(sub)  # labels equal, thresholds included
    else:
        assert np.abs(again[COLOURS].astype(float).to_numpy() - sub[COLOURS].astype(float).to_numpy()).max() < 1e-5
    expected = pd.read_csv(repo / "submissions" / "test_probs.csv")
    assert np.abs(pd.read_csv(probs).iloc[:, 1:].to_numpy() - expected.iloc[:, 1:].to_numpy()).max() < 1e-5


@pytest.mark.training
@pytest.mark.not_isa
def test_the_ensemble_reports_its_fitted_last_step_and_the_honest_chain(staged):
    layout, repo, _ = staged
    report = json.loads((repo / "reports" / "ensemble.json").read_text())
    chosen = report["methods"][report["method"]]
    states = json.loads((repo / "submissions" / "ensemble.json").read_text())["postprocess"]
    analysis = json.loads((repo / "reports" / "oof" / "analysis.json").read_text())
    per_label = analysis["ensemble"]["per_class"]
    assert {"class", "support", "precision", "recall", "f1", "auc", "missed", "invented"} <= set(per_label[0])
    if layout == "tags":  # F-beta: thresholds are among the candidates, each scored cross-fitted
        assert set(chosen["postprocess"]["candidates_oof"]) >= {"identity", "thresholds_per_label+one"}
        assert states[report["method"]]["step"] == chosen["postprocess"]["step"]
        if chosen["postprocess"]["step"] == "thresholds":  # the report shows each label's fitted threshold
            assert [r["threshold"] for r in per_label] == [
                chosen["postprocess"]["thresholds"][r["class"]] for r in per_label
            ]
    else:  # AUC: nothing to fit after the blend
        assert states[report["method"]] == {"step": "identity"}
    assert set(report["oof"]) == set(METRICS) and "oof_method_crossfit" in report
    data = load_prepared(repo / "data" / "prepared", images=False)
    oof = data.task.read_predictions(repo / "submissions" / "oof_probs.csv", data.train["id"], "ensemble")
    assert data.task.scores(oof, data.targets)["mean_column_auc"] == pytest.approx(report["oof"]["mean_column_auc"])
