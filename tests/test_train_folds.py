"""`cv.train_folds`: fewer of the prepared folds trained (down to a single train/validation split). The other
folds' rows stay in every training part and in the refit; the OOF, and everything fitted or chosen on it,
is the trained folds' validation rows alone, cross-fitted over three parts of them when one fold is trained."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import ConfigError, parse_params
from pipeline.data import load_prepared
from pipeline.errors import PipelineError
from tests.conftest import write_competition
from tests.test_holdout import _stages

pytestmark = [pytest.mark.training, pytest.mark.not_isa]  # tiny models; the subject is which rows go where

BACKBONE = "test_resnet"
PARAMS = """
competition: {source: data/raw/comp}
prepare: {image_size: 12, workers: 1}
cv: {n_folds: 3, holdout: 0.2, train_folds: 1}
train:
  backbones: {test_resnet: {}}
  epochs: 2
  batch_size: 4
tta: {select: auto, candidates: [none, hflip]}
ensemble: {methods: [soft_voting, caruana]}
refit: {enabled: true}
tracking: {experiment: train-folds-test}
"""
STAGES = [["prepare"], ["plan"], *([s, "--backbone", BACKBONE] for s in ("train", "predict", "refit"))]


def _csv(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"id": str, "label": str})


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train_folds")
    write_competition(root / "data/raw/comp", n_per_class=12, n_test=6)
    (root / "params.yaml").write_text(PARAMS)
    _stages(root, STAGES + [["ensemble"], ["analyze"]])
    return root


def test_one_trained_fold_trains_one_model_and_its_oof_is_that_folds_rows(run):
    data = load_prepared(run / "data/prepared")
    assert data.n_folds == 3
    assert sorted(p.name for p in (run / f"models/{BACKBONE}/seed42").iterdir()) == ["fold0"]
    fold0 = data.train["id"][data.folds == 0].tolist()
    written = (f"models/{BACKBONE}/oof_probs.csv", f"predictions/{BACKBONE}/oof_probs.csv", "submissions/oof_probs.csv")
    for path in written:
        assert _csv(run / path)["id"].tolist() == fold0, path
    report = json.loads((run / f"reports/train/{BACKBONE}.json").read_text())
    assert report["folds_trained"] == 1 and list(report["folds"]) == ["0"]
    # the refit trains on every training row, the untrained folds' included
    record = json.loads((run / f"refit/{BACKBONE}/refit.json").read_text())
    assert [m["train_rows"] for m in record["models"]] == [len(data.train)]
    html = (run / "reports/oof/index.html").read_text()
    assert f"OOF of the trained folds: {len(fold0)} of {len(data.train)} training rows" in html


def test_one_trained_folds_rows_are_cross_fitted_over_three_stratified_parts(run):
    data = load_prepared(run / "data/prepared", images=False)
    view = data.validated(1)
    assert view.train["id"].tolist() == data.train["id"][data.folds == 0].tolist()
    assert sorted(np.unique(view.folds)) == [0, 1, 2]
    for part in (0, 1, 2):  # every class on both sides: what is fitted on one part scores on the other
        assert set(view.train["label"][view.folds == part]) == set(data.classes)
    two = data.validated(2)  # two of three folds: their own folds, untouched
    np.testing.assert_array_equal(two.folds, data.folds[data.folds < 2])
    assert data.validated(3) is data
    # the TTA choice and the ensemble were cross-fitted over those parts: an honest score for each
    predict = json.loads((run / f"reports/predict/{BACKBONE}.json").read_text())
    assert "log_loss" in predict["oof_selection_crossfit"]
    ensemble = json.loads((run / "reports/ensemble.json").read_text())
    assert ensemble["methods"]["soft_voting"]["oof"]["accuracy"] >= 0 and "holdout" in ensemble


def test_an_oof_file_of_other_rows_is_refused_naming_it(run, tmp_path):
    data = load_prepared(run / "data/prepared", images=False)
    wrong = tmp_path / "oof_probs.csv"
    frame = _csv(run / f"predictions/{BACKBONE}/oof_probs.csv")
    frame.iloc[:-1].to_csv(wrong, index=False)  # fold 0's rows but one
    with pytest.raises(PipelineError, match=rf"{wrong}: its {len(frame) - 1} rows are not the validation rows"):
        data.validated_as_in(wrong)
    other = data.train[data.folds == 1][["id"]]
    other.to_csv(wrong, index=False)  # fold 1's rows alone: not a prefix of the folds
    with pytest.raises(PipelineError, match="are not the validation rows of folds 0..1"):
        data.validated_as_in(wrong)


def test_the_ensemble_refuses_backbones_trained_on_different_folds(run, tmp_path):
    other = tmp_path / "mixed"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("mlflow.db"))
    frame = _csv(other / f"predictions/{BACKBONE}/oof_probs.csv")
    frame.iloc[: len(frame) // 2].to_csv(other / f"predictions/{BACKBONE}/oof_probs.csv", index=False)
    with pytest.raises(AssertionError):  # a one-line error and exit 1 (the stage helper asserts exit 0)
        _stages(other, [["ensemble"]])
    assert (other / "submissions/oof_probs.csv").read_bytes() == (run / "submissions/oof_probs.csv").read_bytes()


@pytest.mark.parametrize("value", [0, 4, "some", 1.5])
def test_train_folds_must_be_null_auto_or_a_number_of_the_folds(value):
    with pytest.raises(ConfigError, match="cv.train_folds"):
        parse_params({"cv": {"n_folds": 3, "train_folds": value}})
    assert parse_params({"cv": {"n_folds": 3, "train_folds": "auto"}}).cv.train_folds == "auto"
