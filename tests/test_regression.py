"""Scores and grades: reading a numeric target, binned folds, the per-fold target scaling, the metrics, the
fitted cut points, bad input, and the real stages end to end on tiny timm models."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from sklearn.metrics import cohen_kappa_score, mean_absolute_error, mean_squared_error
from sklearn.model_selection import KFold

from pipeline.__main__ import main as cli_main
from pipeline.config import ConfigError, TrainSettings, parse_params
from pipeline.data import load_prepared
from pipeline.errors import PipelineError
from pipeline.postprocess import Cuts, _kappa_of_grades, choose_step
from pipeline.prepare import prepare, render_digit_mosaics
from pipeline.tasks import check_params
from pipeline.tasks.regression import Regression, mae, quadratic_weighted_kappa, rmse

ROOT = Path(__file__).resolve().parents[1]


def write_score_competition(
    root: Path, scores, n_test: int = 8, seed: int = 0, column: str = "Pawpularity", id_column: str = "Id"
) -> Path:
    """12x12 grey images whose brightness is 30 + 4 x score (noise added): Pawpularity's layout, `Id,Pawpularity`,
    and a sample submission of fractional values."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()

    def image(score, path):
        value = pd.to_numeric(score, errors="coerce")
        level = 30 + 4 * (0.0 if value != value else float(value)) + rng.integers(-6, 6, (12, 12, 1))
        Image.fromarray(np.clip(np.repeat(level, 3, axis=2), 0, 255).astype(np.uint8)).save(path)

    ids = [f"tr{i:03d}" for i in range(len(scores))]
    for i, s in zip(ids, scores):
        image(s, root / "train" / f"{i}.png")
    pd.DataFrame({id_column: ids, column: scores}).to_csv(root / "train.csv", index=False)
    test_scores = rng.integers(0, 31, n_test)
    test_ids = [f"te{i:03d}" for i in range(n_test)]
    for i, s in zip(test_ids, test_scores):
        image(s, root / "test" / f"{i}.png")
    pd.DataFrame({id_column: test_ids, column: 15.5}).to_csv(root / "sample_submission.csv", index=False)
    pd.DataFrame({id_column: test_ids, column: test_scores}).to_csv(root / "solution.csv", index=False)
    return root


def _comp(source, **extra):
    base = {"source": str(source), "id_column": "Id", "label_column": "Pawpularity", "image_ext": ".png"}
    return {"competition": {**base, **extra}, "prepare": {"image_size": 12, "workers": 1}}


def _prepare(tmp_path, src, n_folds=5, **extra):
    params = parse_params({**_comp(src, **extra), "cv": {"n_folds": n_folds}})
    out = tmp_path / "prepared"
    prepare(params.competition, 12, n_folds, 0, out)
    return load_prepared(out, images=False)


def _prepare_error(tmp_path, src, **extra) -> str:
    with pytest.raises((PipelineError, ConfigError)) as err:
        _prepare(tmp_path, src, **extra)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "prepared").exists()  # nothing half-written
    return str(err.value)


# ---------------------------------------------------------------- reading the target


def test_a_score_is_read_as_a_regression_and_small_integer_classes_stay_single_label(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = _prepare(tmp_path, write_score_competition(tmp_path / "s", rng.integers(0, 60, 80)), metric="rmse")
    assert data.task.name == "regression" and "distinct integers" in capsys.readouterr().out
    assert data.targets.shape == (80, 1) and data.targets.dtype == np.float32
    grades = _prepare(tmp_path / "g", write_score_competition(tmp_path / "g5", np.arange(60) % 5))
    assert grades.task.name == "single_label"  # 0-4 grades: classes under auto
    as_regression = _prepare(tmp_path / "r", tmp_path / "g5", task="regression", metric="quadratic_weighted_kappa")
    assert as_regression.task.name == "regression" and as_regression.task.grades == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_binned_folds_balance_each_folds_target_mean(tmp_path):
    """A skewed score (exponential): each fold's mean target stays near the overall mean, far nearer than
    unstratified folds' (the largest gap over five seeds of KFold)."""
    rng = np.random.default_rng(1)
    scores = np.round(rng.exponential(10.0, 400), 2)
    data = _prepare(tmp_path, write_score_competition(tmp_path / "s", scores), metric="rmse")
    y = data.targets.ravel()
    gap = max(abs(y[data.folds == k].mean() - y.mean()) for k in range(5))
    plain = max(
        abs(y[val].mean() - y.mean())
        for seed in range(5)
        for _, val in KFold(5, shuffle=True, random_state=seed).split(y)
    )
    assert gap < 0.5 * plain, (gap, plain)
    assert gap < 0.1 * y.std()


def test_groups_stay_whole_in_regression_folds_and_the_holdout(tmp_path):
    rng = np.random.default_rng(2)
    src = write_score_competition(tmp_path / "s", rng.integers(0, 40, 90))
    train = pd.read_csv(src / "train.csv")
    train["patient"] = [f"p{i // 3}" for i in range(len(train))]
    train.to_csv(src / "train.csv", index=False)
    params = parse_params({**_comp(src, metric="rmse", group_column="patient"), "cv": {"n_folds": 3, "holdout": 0.2}})
    prepare(params.competition, 12, 3, 0, tmp_path / "prep", holdout=0.2)
    data = load_prepared(tmp_path / "prep", images=False)
    assert (data.train.groupby("group")["fold"].nunique() == 1).all()
    assert not set(data.train["group"]) & set(data.holdout["group"])


# ---------------------------------------------------------------- metrics and the cut points


def test_rmse_mae_and_kappa_equal_scikit_learns():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, 300).astype(float).reshape(-1, 1)
    pred = y + rng.normal(0, 0.8, y.shape)
    assert rmse(pred, y) == pytest.approx(np.sqrt(mean_squared_error(y, pred)), rel=1e-12)
    assert mae(pred, y) == pytest.approx(mean_absolute_error(y, pred), rel=1e-12)
    rounded = np.clip(np.floor(pred + 0.5), 0, 4)  # nearest grade, half-way up
    expected = cohen_kappa_score(y.ravel(), rounded.ravel(), weights="quadratic")
    assert quadratic_weighted_kappa(pred, y, grades=[0, 1, 2, 3, 4]) == pytest.approx(expected, rel=1e-12)
    a, b = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    assert _kappa_of_grades(a, b, 5) == pytest.approx(cohen_kappa_score(b, a, weights="quadratic"), rel=1e-12)


def test_cut_points_on_a_hand_made_ordinal_oof_are_the_ones_computed_here():
    """Every grade predicted 0.6-0.9 too high: rounding puts most a grade up; the fitted cut between grades
    g - 1 and g is half-way between the highest prediction of g - 1 and the lowest of g, and kappa is 1."""
    rng = np.random.default_rng(4)
    y = rng.integers(0, 4, 200).astype(float).reshape(-1, 1)
    pred = y + rng.uniform(0.6, 0.9, y.shape)
    task = Regression(low=0, high=3, grades=[0, 1, 2, 3])
    cuts = Cuts(task).fit(pred, y)
    expected = [(pred[y == g - 1].max() + pred[y == g].min()) / 2 for g in (1, 2, 3)]
    assert cuts.cuts == pytest.approx(expected, abs=1e-12)
    assert quadratic_weighted_kappa(pred, y, task.grades) < 0.9
    assert quadratic_weighted_kappa(cuts.transform(pred), y, task.grades) == 1.0
    folds = np.arange(200) % 4
    step, scores, honest = choose_step(task, "quadratic_weighted_kappa", pred, y, folds)
    assert step.name == "cuts" and scores["cuts"] > scores["identity"] + 0.1


def test_a_view_is_back_in_units_and_clipped_to_the_folds_training_range():
    s = TrainSettings(regression_loss="mse")
    task = Regression(low=0, high=100, grades=None).fit_target(np.array([[10.0], [20.0], [30.0]]), s)
    out = task.outputs(torch.tensor([[0.0], [50.0], [-50.0]])).numpy().ravel()
    assert out[0] == pytest.approx(20.0) and out[1] == 30.0 and out[2] == 10.0  # mean, then the range's ends
    unit = task.fit_target(np.array([[10.0], [30.0]]), dataclasses.replace(s, regression_loss="bce"))
    assert unit.to_model_space(np.array([10.0, 20.0, 30.0])).tolist() == [0.0, 0.5, 1.0]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "value, message",
    [("abc", "row 5: target 'abc' is not a number"), ("nan", "row 5: target 'nan' is not a number")],
)
def test_a_non_numeric_or_nan_target_names_its_row(tmp_path, value, message):
    src = write_score_competition(tmp_path / "s", list(range(40)))
    train = pd.read_csv(src / "train.csv", dtype=str)
    train.loc[3, "Pawpularity"] = value
    train.to_csv(src / "train.csv", index=False)
    assert message in _prepare_error(tmp_path, src, task="regression", metric="rmse")


def test_string_labels_asked_for_as_a_regression_are_named(tmp_path):
    src = write_score_competition(tmp_path / "s", ["cat", "dog"] * 20)
    error = _prepare_error(tmp_path, src, task="regression", metric="rmse")
    assert "row 2: target 'cat' is not a number" in error and "competition.task: regression" in error


def test_a_constant_target_is_refused(tmp_path):
    src = write_score_competition(tmp_path / "s", [7.5] * 30)
    assert "the target is constant (7.5 in every row)" in _prepare_error(
        tmp_path, src, task="regression", metric="rmse"
    )


def test_a_metric_of_the_other_kind_of_task_is_named(tmp_path):
    rng = np.random.default_rng(5)
    score = write_score_competition(tmp_path / "s", np.round(rng.uniform(0, 50, 40), 1))
    assert "competition.metric: accuracy is not a regression metric" in _prepare_error(
        tmp_path, score, metric="accuracy", task="regression"
    )
    classes = write_score_competition(tmp_path / "c", np.arange(40) % 4)
    assert "competition.metric: rmse is not a single_label metric" in _prepare_error(
        tmp_path / "x", classes, metric="rmse"
    )


@pytest.mark.parametrize(
    "train, key",
    [
        ({"class_weight": "balanced"}, "train.class_weight: balanced"),
        ({"label_smoothing": 0.1}, "train.label_smoothing: 0.1"),
        ({"sampler": "balanced"}, "train.sampler: balanced"),
    ],
)
def test_a_classification_setting_on_a_regression_is_a_config_error_naming_it(train, key):
    task = Regression(low=0, high=10)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        task.check_settings(TrainSettings(**train), "train@x")


def test_a_method_not_defined_for_a_regression_names_those_that_are():
    task = Regression(low=0, high=10)
    raw = {"competition": {"task": "regression", "metric": "rmse"}, "ensemble": {"methods": ["hard_voting"]}}
    with pytest.raises(ConfigError, match="defined: soft_voting, caruana, optimized, stacking"):
        check_params(parse_params(raw), task, "ensemble")
    with pytest.raises(ConfigError, match="tta.metric: log_loss is not a regression metric"):
        check_params(parse_params({**raw, "ensemble": {}, "tta": {"metric": "log_loss"}}), task, "ensemble")


def test_a_regression_writes_the_samples_numbers_integers_or_grades():
    task = Regression(low=0, high=4, grades=[0, 1, 2, 3, 4])
    sample = pd.DataFrame({"Id": ["a", "b"], "target": [1.5, 2.5]})
    pred = np.array([[1.26], [3.74]])
    numbers = task.submission_format(sample, "sample")
    assert numbers.kind == "number" and task.submission(["a", "b"], pred, numbers)["target"].tolist() == [1.26, 3.74]
    integers = task.submission_format(sample.assign(target=[1, 2]), "sample")
    assert task.submission(["a", "b"], pred, integers)["target"].tolist() == [1, 4]
    grades = task.submission_format(sample, "sample", metric="quadratic_weighted_kappa")
    sub = task.submission(["a", "b"], pred, grades)
    assert sub["target"].tolist() == [1, 4]
    task.check_submission(sub, sample, grades)
    with pytest.raises(PipelineError, match="row 3: 7 is not a grade"):
        task.check_submission(sub.assign(target=[1, 7]), sample, grades)


# ---------------------------------------------------------------- the real stages


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """The real stages (prepare .. analyze, then the bundle; the submission's method: stacking's ridge) on a
    tiny graded score (0-47) scored by kappa: one backbone trained with BCE on the scaled target and mixup,
    one features+sklearn (a ridge head), two folds and a holdout; the score demo (RMSE) runs through every
    stage with `make run PRESET=regression`."""
    repo = tmp_path_factory.mktemp("regression")
    shutil.copy(ROOT / "params.yaml", repo)
    shutil.copytree(ROOT / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    scores = np.random.default_rng(6).permutation(48)  # distinct: the highest is in one fold's validation rows
    write_score_competition(repo / "comp", scores)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["competition"].update(_comp("comp", task="regression", metric="quadratic_weighted_kappa")["competition"])
    params["prepare"].update(image_size=12, workers=1)
    params["cv"].update(n_folds=2, holdout=0.2)
    params["train"].update(
        backbones={"test_resnet": {}, "ridge": {"model": "test_resnet", "finetune": "features+sklearn"}},
        epochs=2, batch_size=8, lr=0.01, mixup_alpha=0.2, monitor="rmse", regression_loss="bce",
    )  # fmt: skip
    params["tta"].update(select="auto", candidates=["none", "hflip"], metric="rmse")
    params["ensemble"].update(methods=["soft_voting", "caruana", "optimized", "stacking"], method="stacking")
    params["tracking"] = {"enabled": False}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    stages = [["prepare"], ["tune", "--backbone", "test_resnet"], ["tune", "--backbone", "ridge"], ["plan"]]
    stages += [[stage, "--backbone", b] for b in ("test_resnet", "ridge") for stage in ("train", "predict")]
    stages += [["ensemble"], ["analyze"], ["bundle"]]
    here = os.getcwd()
    os.chdir(repo)  # the stages' doors, in this process (each as `python -m pipeline <stage>` runs it)
    try:
        for stage in stages:
            assert cli_main(stage) == 0, stage
    finally:
        os.chdir(here)
    return repo, env


@pytest.mark.training
@pytest.mark.not_isa  # its subject is what the stages and the bundle write, not float results
def test_the_stages_write_graded_submissions_and_the_bundle_reproduces_them(staged):
    repo, env = staged
    sub = pd.read_csv(repo / "submissions" / "submission.csv")
    sample = pd.read_csv(repo / "comp" / "sample_submission.csv")
    assert list(sub.columns) == list(sample.columns) and sub["Id"].tolist() == sample["Id"].tolist()
    assert sub["Pawpularity"].dtype.kind == "i" and sub["Pawpularity"].between(0, 30).all()
    out, probs = repo / "bundle_sub.csv", repo / "bundle_probs.csv"
    proc = subprocess.run(
        [sys.executable, "bundle/predict.py", "--test-dir", "comp/test", "--sample", "comp/sample_submission.csv",
         "--out", str(out), "--probs", str(probs)],
        cwd=repo, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert pd.read_csv(out).equals(sub)  # grades equal, cut points included
    expected = pd.read_csv(repo / "submissions" / "test_probs.csv")
    assert np.abs(pd.read_csv(probs)["prediction"] - expected["prediction"]).max() < 1e-5


@pytest.mark.training
@pytest.mark.not_isa
def test_the_target_scaling_is_fitted_on_each_folds_training_rows_only(staged):
    """The scores are distinct, so the highest is in one fold's validation rows: that fold's scaling (stored in
    its checkpoint) must not reach it, and its mean is the training rows' mean."""
    repo, _ = staged
    data = load_prepared(repo / "data" / "prepared", images=False)
    y, folds = data.targets.ravel().astype(np.float64), data.folds
    for k in range(2):
        ckpt = torch.load(repo / "models" / "test_resnet" / "seed42" / f"fold{k}" / "model.pt", weights_only=True)
        scale = ckpt["target_scale"]
        train = y[folds != k]
        assert (scale["low"], scale["high"]) == (train.min(), train.max())
        assert scale["mean"] == pytest.approx(train.mean(), rel=1e-9) and scale["kind"] == "unit"
    assert any(y[folds == k].max() > y[folds != k].max() for k in range(2))  # the check above can fail


@pytest.mark.training
@pytest.mark.not_isa
def test_predictions_never_leave_the_training_range_and_reports_carry_every_metric(staged):
    repo, _ = staged
    data = load_prepared(repo / "data" / "prepared", images=False)
    low, high = data.targets.min(), data.targets.max()
    for b in ("test_resnet", "ridge"):
        for name in ("oof_probs.csv", "test_probs.csv", "holdout_probs.csv"):
            values = pd.read_csv(repo / "predictions" / b / name)["prediction"]
            assert values.between(low, high).all() and values.std() > 0, (b, name)
    report = json.loads((repo / "reports" / "ensemble.json").read_text())
    assert set(report["oof"]) == {"rmse", "mae", "quadratic_weighted_kappa"}
    chosen = report["methods"][report["method"]]
    assert set(chosen["postprocess"]["candidates_oof"]) == {"identity", "cuts"}
    analysis = json.loads((repo / "reports" / "oof" / "analysis.json").read_text())
    per_bin = analysis["ensemble"]["per_class"]
    assert {"class", "support", "mean_true", "mean_predicted", "bias", "mae"} <= set(per_bin[0])
    assert (repo / "reports" / "oof" / "index.html").read_text().count("predicted against true") >= 1


def test_the_score_demo_renders_offline_as_a_regression(tmp_path, capsys):
    src = render_digit_mosaics(tmp_path / "sum", "sum", n_train=60, n_test=5)
    params = parse_params(
        {"competition": {"source": str(src), "label_column": "score", "image_ext": ".png", "metric": "rmse"}}
    )
    prepare(params.competition, 16, 3, 0, tmp_path / "prep")
    data = load_prepared(tmp_path / "prep", images=False)
    assert data.task.name == "regression" and 0 <= data.targets.min() and data.targets.max() <= 36
    assert "auto: numbers in column 'score'" in capsys.readouterr().out
