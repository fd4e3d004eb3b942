"""The refit stage: after CV, models trained on every training row outside cv.holdout for the epochs the folds
kept, predicting test and holdout with the chosen TTA; they enter the submission by refit.rule, a fixed
rule, and never reach a choice fitted on OOF."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import loop
from pipeline.bundle import verify_bundle, write_bundle
from pipeline.config import TrainSettings, load_params
from pipeline.data import load_prepared
from pipeline.ensemble import fit_stage
from pipeline.ensemblers import ensemble_from_state
from pipeline.errors import PipelineError
from pipeline.inference import fold_input_config, load_fold_model
from pipeline.loop import epoch_batches
from pipeline.paths import RunPaths
from pipeline.postprocess import step_from_state
from pipeline.refit import refit_settings
from pipeline.tta import predict_tta
from tests.conftest import write_competition
from tests.test_holdout import _stages

pytestmark = [pytest.mark.training, pytest.mark.not_isa]  # tiny models; the subject is which rows and models go where

BACKBONES = ("test_resnet", "test_efficientnet")
PARAMS = """
competition: {source: data/raw/comp}
prepare: {image_size: 12, workers: 1}
cv: {n_folds: 2, holdout: 0.2}
train:
  backbones: {test_resnet: {}, test_efficientnet: {lr: 0.01}}
  epochs: 3
  batch_size: 4
  ema_decay: 0.9
tta: {select: auto, candidates: [none, hflip]}
ensemble: {methods: [soft_voting, caruana]}
refit: {enabled: true, seeds: [7, 8], rule: replace}
tracking: {experiment: refit-test}
"""
CPU = torch.device("cpu")


def _csv(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"id": str, "label": str})


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("refit")
    write_competition(root / "data/raw/comp", n_per_class=10, n_test=6)
    (root / "params.yaml").write_text(PARAMS)
    stages = [["prepare"], ["plan"]]
    stages += [[s, "--backbone", b] for b in BACKBONES for s in ("train", "predict", "refit")]
    _stages(root, stages + [["ensemble"]])
    return root


def test_a_refit_trains_on_exactly_the_rows_outside_the_holdout_for_the_planned_updates(run, tmp_path, monkeypatch):
    """Run again under spies: every refit model's dataset is every row of the prepared training table (none
    of cv.holdout's), and it takes round(mean kept epochs x batches per epoch) optimizer updates."""
    other = tmp_path / "again"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("mlflow.db", "refit"))
    datasets, updates, step, dataset = [], [], loop._step, loop.ImageDataset
    monkeypatch.setattr(loop, "_step", lambda *a: (updates.append(1), step(*a)))
    monkeypatch.setattr(loop, "ImageDataset", lambda images, *a: datasets.append(images) or dataset(images, *a))
    _stages(other, [["refit", "--backbone", "test_resnet"]])
    data = load_prepared(other / "data/prepared")
    assert len(datasets) == 2  # refit.seeds: [7, 8]
    for images in datasets:
        np.testing.assert_array_equal(images.index, np.arange(len(data.train)))
    assert not set(data.train["id"]) & set(data.holdout["id"])
    kept = [f["best_epoch"] for f in json.loads((run / "reports/train/test_resnet.json").read_text())["folds"].values()]
    per_epoch = len(data.train) // 4  # batch_size 4, drop_last
    assert len(updates) == 2 * sum(epoch_batches(np.mean(kept), per_epoch))
    record = json.loads((other / "refit/test_resnet/refit.json").read_text())
    assert record["epochs"] == pytest.approx(np.mean(kept)) and record["seeds"] == [7, 8]
    assert [m["train_rows"] for m in record["models"]] == [len(data.train)] * 2
    _, ckpt = load_fold_model(other / "refit/test_resnet/seed7/model.pt", CPU)
    np.testing.assert_allclose(ckpt["mean"], data.stats["mean"])  # every training row's statistics, no fold's
    assert ckpt["fold"] is None and ckpt["train_rows"] == len(data.train)


def test_refit_predictions_are_the_refit_models_under_the_chosen_tta(run):
    data = load_prepared(run / "data/prepared")
    for b in BACKBONES:
        tta = json.loads((run / f"predictions/{b}/tta.json").read_text())
        probs = []
        for seed in (7, 8):
            model, ckpt = load_fold_model(run / f"refit/{b}/seed{seed}/model.pt", CPU)
            cfg = fold_input_config(ckpt, CPU)
            probs.append(predict_tta(model, data.test_images, cfg, 4, CPU, tuple(tta["views"]), data.task))
        written = _csv(run / f"refit/{b}/test_probs.csv")
        assert written["id"].tolist() == data.test["id"].tolist()
        np.testing.assert_allclose(written[data.classes].to_numpy(), np.mean(probs, 0), atol=1e-5)
        assert _csv(run / f"refit/{b}/holdout_probs.csv")["id"].tolist() == data.holdout["id"].tolist()


def test_a_refit_model_never_enters_an_oof_fitted_choice(run, tmp_path):
    """Other refit predictions (every row's probabilities rolled by one class): the ensemble fits, chooses and
    writes every OOF-side number exactly as before; only the test side moves, and it is the fitted method
    and last step applied to the refit predictions (refit.rule: replace)."""
    other = tmp_path / "other"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("mlflow.db"))
    data = load_prepared(other / "data/prepared", images=False)
    for b in BACKBONES:
        for part in ("test", "holdout"):
            frame = _csv(other / f"refit/{b}/{part}_probs.csv")
            frame[data.classes] = np.roll(frame[data.classes].to_numpy(), 1, axis=1)
            frame.to_csv(other / f"refit/{b}/{part}_probs.csv", index=False)
    _stages(other, [["ensemble"]])
    for path in ("submissions/oof_probs.csv",):
        assert (other / path).read_bytes() == (run / path).read_bytes(), path
    before, after = (json.loads((r / "reports/ensemble.json").read_text()) for r in (run, other))
    assert after["method"] == before["method"] and after["oof"] == before["oof"]
    assert after["refit"] == dict.fromkeys(BACKBONES, "replace")
    for name, method in before["methods"].items():
        assert after["methods"][name]["oof"] == method["oof"]
        assert after["methods"][name].get("weights") == method.get("weights")
    states = [json.loads((r / "submissions/ensemble.json").read_text()) for r in (run, other)]
    assert states[0]["states"] == states[1]["states"] and states[0]["postprocess"] == states[1]["postprocess"]
    assert (other / "submissions/test_probs.csv").read_bytes() != (run / "submissions/test_probs.csv").read_bytes()
    state, ids = states[1], data.test["id"].tolist()
    refits = [data.task.read_predictions(other / f"refit/{b}/test_probs.csv", ids, b) for b in BACKBONES]
    model = ensemble_from_state(state["states"][state["method"]], "ensemble.json")
    expected = step_from_state(state["postprocess"][state["method"]], data.task).transform(model.predict_proba(refits))
    written = _csv(other / "submissions/test_probs.csv")[data.classes].to_numpy()
    np.testing.assert_allclose(written, expected, atol=1e-6)
    for b in BACKBONES:  # replace: the fold models predicted no test or holdout rows, which nothing reads
        assert not (other / f"predictions/{b}/test_probs.csv").exists()
        assert not (other / f"predictions/{b}/holdout_probs.csv").exists()
        assert "holdout_fold_bag" not in after["backbones"][b] and "holdout" in after["backbones"][b]


def test_join_averages_the_fold_bag_and_the_refit(run, tmp_path):
    other = tmp_path / "join"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("mlflow.db"))
    (other / "params.yaml").write_text(
        PARAMS.replace("rule: replace", "rule: join").replace("[soft_voting, caruana]", "[soft_voting]")
    )
    _stages(other, [["predict", "--backbone", b] for b in BACKBONES] + [["ensemble"]])  # join: the bag's test side too
    report = json.loads((other / "reports/ensemble.json").read_text())
    assert all("holdout_fold_bag" in report["backbones"][b] for b in BACKBONES)
    data = load_prepared(other / "data/prepared", images=False)
    ids = data.test["id"].tolist()
    members = [
        (data.task.read_predictions(other / f"predictions/{b}/test_probs.csv", ids, b)
         + data.task.read_predictions(other / f"refit/{b}/test_probs.csv", ids, b)) / 2
        for b in BACKBONES
    ]  # fmt: skip
    state = json.loads((other / "submissions/ensemble.json").read_text())
    model = ensemble_from_state(state["states"]["soft_voting"], "ensemble.json")
    expected = step_from_state(state["postprocess"]["soft_voting"], data.task).transform(model.predict_proba(members))
    np.testing.assert_allclose(_csv(other / "submissions/test_probs.csv")[data.classes].to_numpy(), expected, atol=1e-6)


def test_refit_off_writes_its_record_alone_and_the_ensemble_refuses_a_missing_refit(run, tmp_path):
    other = tmp_path / "off"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("mlflow.db"))
    (other / "params.yaml").write_text(PARAMS.replace("enabled: true", "enabled: false"))
    _stages(other, [["refit", "--backbone", "test_resnet"]])
    assert sorted(p.name for p in (other / "refit/test_resnet").iterdir()) == ["refit.json"]
    assert json.loads((other / "refit/test_resnet/refit.json").read_text()) == {"enabled": False}
    (other / "params.yaml").write_text(PARAMS)  # on again, but test_resnet's refit is the one that was off
    data = load_prepared(other / "data/prepared", images=False)
    with pytest.raises(PipelineError, match=r"refit/test_resnet/refit.json: no refit of test_resnet"):
        fit_stage(load_params(other / "params.yaml"), data, other / "predictions", "params.yaml", other / "refit")


def test_refit_settings_take_the_folds_mean_epochs_and_the_majoritys_ema():
    s = TrainSettings(epochs=4, ema_decay=0.99, early_stopping_patience=2, mixup_off_epoch=2, bootstrap=True)
    most = refit_settings(s, {"epochs": [2.0, 3.0], "ema": [True, True, False], "train_rows": [8, 8]})
    assert most.epochs == 2.5 and most.ema_decay == 0.99
    assert most.early_stopping_patience is None and not most.bootstrap and most.seeds is None
    assert most.mixup_off_epoch == 1  # moved with the epochs (2 of 4 -> round(1.25))
    tie = refit_settings(s, {"epochs": [4.0, 4.0], "ema": [True, False], "train_rows": [8, 8]})
    assert tie.ema_decay is None and tie.epochs == 4  # half is no majority
    head = refit_settings(
        TrainSettings(finetune="features+sklearn"), {"epochs": [0.0], "ema": [False], "train_rows": [8]}
    )
    assert head.epochs == TrainSettings().epochs  # one fit, no epochs to take


@pytest.mark.parametrize("rule", ["replace", "join"])
def test_the_bundle_carries_the_refit_models_and_reproduces_the_submission(run, tmp_path, monkeypatch, rule):
    other = tmp_path / "run"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("mlflow.db"))
    (other / "params.yaml").write_text(PARAMS.replace("rule: replace", f"rule: {rule}"))
    _stages(other, [["predict", "--backbone", b] for b in BACKBONES] + [["ensemble"]])
    out = tmp_path / "bundle"
    out.mkdir()
    monkeypatch.chdir(tmp_path)  # the bundle reads the run through RunPaths alone
    spec = write_bundle(load_params(other / "params.yaml"), RunPaths(other), out)
    checked = verify_bundle(
        out, load_params(other / "params.yaml").competition, spec["ensemble"]["method"], RunPaths(other)
    )
    assert checked["max_abs_diff"] <= 1e-5
    for member in spec["members"]:
        refits = member["models"] if rule == "replace" else member["join"]
        assert [m["checkpoint"]["seed"] for m in refits] == [7, 8] and all(
            m["checkpoint"]["fold"] is None for m in refits
        )
        if rule == "join":
            assert {m["checkpoint"]["fold"] for m in member["models"]} == {0, 1}


def test_refit_auto_follows_the_plans_choice_in_predict_refit_and_ensemble(run, tmp_path, capsys):
    """refit.enabled: auto without a budget: the plan writes no refit, the refit stage says so and the ensemble
    submits the fold bags; plan files that say refit (as a budget's plan does) make predict compute OOF alone
    and the ensemble take the refit models' test predictions."""
    other = tmp_path / "auto"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("mlflow.db"))
    (other / "params.yaml").write_text(PARAMS.replace("enabled: true", "enabled: auto"))
    stages = [["plan"]] + [[s, "--backbone", b] for b in BACKBONES for s in ("predict", "refit")]
    _stages(other, stages + [["ensemble"]])
    assert "refit test_resnet: off (refit.enabled: the plan chose none)" in capsys.readouterr().out
    for b in BACKBONES:
        assert json.loads((other / f"plan/{b}.json").read_text())["refit"] is False
        assert json.loads((other / f"refit/{b}/refit.json").read_text()) == {"enabled": False}
        assert (other / f"predictions/{b}/test_probs.csv").exists()  # the fold bag predicts the test set
    assert json.loads((other / "reports/ensemble.json").read_text())["refit"] == dict.fromkeys(BACKBONES)
    shutil.copytree(run / "refit", other / "refit", dirs_exist_ok=True)  # the refit models, as if trained here
    for b in BACKBONES:
        entry = json.loads((other / f"plan/{b}.json").read_text())
        (other / f"plan/{b}.json").write_text(json.dumps({**entry, "refit": True}))
    _stages(other, [["predict", "--backbone", b] for b in BACKBONES] + [["ensemble"]])
    for b in BACKBONES:
        assert not (other / f"predictions/{b}/test_probs.csv").exists()  # replace: OOF alone
    assert json.loads((other / "reports/ensemble.json").read_text())["refit"] == dict.fromkeys(BACKBONES, "replace")
    assert (other / "submissions/test_probs.csv").read_bytes() == (run / "submissions/test_probs.csv").read_bytes()
    # a plan that dropped TTA (plan_tta, under a short budget): predict computes and keeps the `none` policy alone
    entry = json.loads((other / "plan/test_resnet.json").read_text())
    (other / "plan/test_resnet.json").write_text(json.dumps({**entry, "tta": "none"}))
    _stages(other, [["predict", "--backbone", "test_resnet"]])
    tta = json.loads((other / "predictions/test_resnet/tta.json").read_text())
    assert tta["policy"] == "none" and list(tta["policies"]) == ["none"]
