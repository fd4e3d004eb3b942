"""`cv.holdout`: a stratified share of the training rows kept out of every fold, predicted as the test set
is (every fold model, the chosen TTA, the ensemble fitted on OOF) and scored beside the OOF. It must be in
no fold, in no statistic, in no OOF file and in no choice."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import __main__ as cli
from pipeline.config import CompetitionConfig, ConfigError, parse_params
from pipeline.data import load_prepared
from pipeline.ensemblers import ensemble_from_state
from pipeline.errors import PipelineError
from pipeline.inference import fold_input_config, load_fold_model
from pipeline.prepare import prepare
from pipeline.tta import predict_tta
from tests.conftest import write_competition

pytestmark = [pytest.mark.training, pytest.mark.not_isa]  # trains tiny models; its subject is where rows go

BACKBONES = ("test_resnet", "test_efficientnet")
PARAMS = """
competition: {source: data/raw/comp}
prepare: {image_size: 12, workers: 1}
cv: {n_folds: 2, holdout: 0.2}
train:
  backbones: {test_resnet: {}, test_efficientnet: {lr: 0.01}}
  epochs: 1
  batch_size: 4
tta: {select: auto, candidates: [none, hflip, airbench]}
ensemble: {methods: [soft_voting, caruana, optimized]}
tracking: {experiment: holdout-test}
"""
STAGES = [
    ["prepare"],
    ["plan"],
    *([s, "--backbone", b] for b in BACKBONES for s in ("train", "predict")),
    ["ensemble"],
    ["analyze"],
]


def _stages(root: Path, stages: list[list[str]]) -> None:
    cwd, uri = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(root)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    try:
        for stage in stages:
            assert cli.main(stage) == 0, stage
    finally:
        os.chdir(cwd)
        if uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = uri


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("holdout")
    write_competition(root / "data/raw/comp", n_per_class=10, n_test=6)
    (root / "params.yaml").write_text(PARAMS)
    _stages(root, STAGES)
    return root


def _csv(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"id": str, "label": str})


def test_the_holdout_is_a_stratified_share_in_no_fold_and_in_no_statistic(run, tmp_path):
    prepared = run / "data/prepared"
    train, held = _csv(prepared / "train.csv"), _csv(prepared / "holdout.csv")
    everyone = _csv(run / "data/raw/comp/train.csv")
    assert not set(train["id"]) & set(held["id"]) and set(train["id"]) | set(held["id"]) == set(everyone["id"])
    assert held["label"].value_counts().to_dict() == {"cat": 2, "dog": 2, "frog": 2}  # 0.2 of 10 per class
    data = load_prepared(prepared)
    assert len(data.train_images) == len(train) and len(data.holdout_images) == len(held) == 6
    images = np.asarray(data.train_images, dtype=np.float64) / 255  # normalisation from the fold rows only
    np.testing.assert_allclose(data.stats["mean"], images.mean((0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(data.stats["folds"]["0"]["mean"], images[data.folds != 0].mean((0, 1, 2)), atol=1e-6)
    # the held-out rows' own images, as a split without holdout decodes them
    prepare(CompetitionConfig(source=str(run / "data/raw/comp")), 12, 2, 42, tmp_path / "all", workers=1)
    full = load_prepared(tmp_path / "all")
    row = {i: k for k, i in enumerate(full.train["id"])}
    np.testing.assert_array_equal(data.holdout_images, full.train_images[[row[i] for i in held["id"]]])
    assert full.holdout is None and not (tmp_path / "all/holdout.csv").exists()


def test_the_holdout_is_predicted_as_the_test_set_and_never_in_an_oof_file(run):
    data = load_prepared(run / "data/prepared")
    ids = data.train["id"].tolist()
    for backbone in BACKBONES:
        folder = run / "predictions" / backbone
        assert _csv(folder / "oof_probs.csv")["id"].tolist() == ids
        held = _csv(folder / "holdout_probs.csv")
        assert held["id"].tolist() == data.holdout["id"].tolist()
        tta = json.loads((folder / "tta.json").read_text())
        bag = []  # every fold model under the chosen policy, averaged, as test_probs.csv is
        for k in range(2):
            model, ckpt = load_fold_model(run / f"models/{backbone}/seed42/fold{k}/model.pt", torch.device("cpu"))
            cfg = fold_input_config(ckpt, torch.device("cpu"))
            bag.append(predict_tta(model, data.holdout_images, cfg, 4, torch.device("cpu"), tta["views"], data.task))
        np.testing.assert_allclose(held[data.classes].to_numpy(), np.mean(bag, 0), atol=1e-5)
        assert tta["holdout"] == pytest.approx(
            data.task.scores(np.mean(bag, 0), data.holdout["target"].to_numpy()), abs=1e-5
        )
    assert _csv(run / "submissions/oof_probs.csv")["id"].tolist() == ids
    report = json.loads((run / "reports/ensemble.json").read_text())
    metrics = json.loads((run / "reports/metrics.json").read_text())
    assert metrics["holdout_accuracy"] == pytest.approx(report["holdout"]["accuracy"], abs=1e-5)
    assert report["holdout"] == report["methods"][report["method"]]["holdout"]
    assert set(report["backbones"]["test_resnet"]["holdout"]) >= {"accuracy", "log_loss"}


def test_the_holdout_scores_reach_mlflow_and_the_report(run):
    client = MlflowClient(f"sqlite:///{run}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("holdout-test").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    report = json.loads((run / "reports/ensemble.json").read_text())
    assert by_name["ensemble"].data.metrics["holdout_accuracy"] == pytest.approx(report["holdout"]["accuracy"])
    assert "holdout_log_loss" in by_name["predict test_resnet"].data.metrics
    summary = json.loads((run / "reports/oof/summary.json").read_text())
    assert summary["ensemble"]["holdout_accuracy"] == pytest.approx(report["holdout"]["accuracy"])
    assert by_name["analyze"].data.metrics["ensemble.holdout_accuracy"] == pytest.approx(report["holdout"]["accuracy"])
    assert "cv.holdout" in (run / "reports/oof/index.html").read_text()


def test_the_holdout_changes_no_choice_only_its_own_score(run, tmp_path):
    """Other labels and other images on the held-out rows: predict and ensemble choose, fit and write
    exactly what they did; only the holdout's probabilities and scores move."""
    other = tmp_path / "other"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("mlflow.db"))
    held = _csv(other / "data/prepared/holdout.csv")
    held["target"] = (held["target"] + 1) % 3
    held["label"] = [["cat", "dog", "frog"][t] for t in held["target"]]
    held.to_csv(other / "data/prepared/holdout.csv", index=False)
    images = np.load(other / "data/prepared/holdout_images.npy")
    np.save(other / "data/prepared/holdout_images.npy", np.ascontiguousarray(255 - images))
    _stages(other, [["predict", "--backbone", b] for b in BACKBONES] + [["ensemble"]])
    same = ["submissions/submission.csv", "submissions/oof_probs.csv", "submissions/test_probs.csv"]
    same += [f"predictions/{b}/{f}_probs.csv" for b in BACKBONES for f in ("oof", "test")]
    for path in same:
        assert (other / path).read_bytes() == (run / path).read_bytes(), path
    before, after = (json.loads((r / "reports/ensemble.json").read_text()) for r in (run, other))
    for key in ("method", "oof"):
        assert after[key] == before[key]
    for name, method in before["methods"].items():
        assert after["methods"][name].get("weights") == method.get("weights")
    for b in BACKBONES:
        assert after["backbones"][b]["tta"] == before["backbones"][b]["tta"]
    # the holdout's own score: the chosen method's fitted numbers on the backbones' held-out predictions,
    # against the held-out labels, recomputed here for both runs (other labels and images, other scores)
    for r, labels in ((run, _csv(run / "data/prepared/holdout.csv")), (other, held)):
        data = load_prepared(r / "data/prepared", images=False)
        state = json.loads((r / "submissions/ensemble.json").read_text())
        model = ensemble_from_state(state["states"][state["method"]], "ensemble.json")
        probs = [
            data.task.read_predictions(r / f"predictions/{b}/holdout_probs.csv", labels["id"], b) for b in BACKBONES
        ]
        expected = data.task.scores(model.predict_proba(probs), labels["target"].to_numpy())
        report = after if r == other else before
        assert report["holdout"] == pytest.approx(expected, abs=1e-9)
    assert after["holdout"] != before["holdout"]


def test_a_group_aware_holdout_keeps_each_group_on_one_side(tmp_path):
    comp = write_competition(tmp_path / "comp", n_per_class=12)
    train = pd.read_csv(comp / "train.csv")
    train["patient"] = [f"p{i // 3}" for i in range(len(train))]  # groups of 3 rows
    train.to_csv(comp / "train.csv", index=False)
    config = CompetitionConfig(source=str(comp), group_column="patient")
    prepare(config, 8, 2, 0, tmp_path / "prepared", workers=1, holdout=0.25)
    inside, held = _csv(tmp_path / "prepared/train.csv"), _csv(tmp_path / "prepared/holdout.csv")
    assert len(held) and not set(inside["group"]) & set(held["group"])
    assert set(held["label"]) == {"cat", "dog", "frog"}


@pytest.mark.parametrize("share", [0.0, 0.7, -0.1])
def test_a_holdout_share_outside_0_to_half_is_a_one_line_error(share):
    message = rf"params.yaml: cv.holdout must be null or a share in \(0, 0.5\], got {share}"
    with pytest.raises(ConfigError, match=message):
        parse_params({"cv": {"holdout": share}}, "params.yaml")


def test_a_holdout_too_small_to_stratify_names_the_key(tmp_path):
    comp = write_competition(tmp_path / "comp", n_per_class=4)
    with pytest.raises(PipelineError, match=r"train.csv: cv.holdout=0.1 cannot be drawn stratified: ") as err:
        prepare(CompetitionConfig(source=str(comp)), 8, 2, 0, tmp_path / "prepared", workers=1, holdout=0.1)
    assert "\n" not in str(err.value) and not (tmp_path / "prepared").exists()
