"""The time-budget planner: its arithmetic on a fake speed table, and its plan followed by training."""

import dataclasses
import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from pipeline import __main__ as cli
from pipeline.analyze import plan_choices
from pipeline.backbone import Backbone, apply_plan
from pipeline.config import TrainSettings, parse_params, resolve_train_settings
from pipeline.errors import PipelineError
from pipeline.plan import (
    IDLE_STAGE_S,
    MARGIN,
    PROBE_BUDGET_SHARE,
    PROBE_MIN_BATCHES,
    STAGE_OVERHEAD_S,
    BackboneWork,
    Speed,
    backbone_work,
    make_plan,
    no_budget,
    plan_epochs,
    plan_from_speeds,
    plan_refit,
    plan_scheme,
    probe_batches,
    refit_seconds,
    train_seconds,
)
from tests.conftest import plan_just_over_the_minimum, write_competition

# a fake machine: 100 training and 1,000 inference images/s; 3 folds of 1,000 training / 500 validation rows
WORK = BackboneWork(epochs=10, val_every=10, fits=3, train_rows=1000, val_rows=500, val_models=1, predict_images=3000)
SPEED = Speed(train=100.0, infer=1000.0)


def test_the_plan_takes_the_most_epochs_that_fit_the_budget():
    fixed = {"prepare": 60.0, "predict": 40.0}
    epochs = plan_epochs(600, fixed, {"net": WORK}, {"net": SPEED})["net"]
    available = 600 * (1 - MARGIN) - 100  # the plan keeps a margin for speeds that vary over a run
    # each epoch is 3 folds x 1,000 rows / 100 per s = 30 s, plus 10.5 s of setup and one validation:
    # 14.31 epochs in the 440 s left (fractional, in hundredths: nothing left idle), not params' 10
    assert train_seconds(WORK, SPEED, epochs) <= available < train_seconds(WORK, SPEED, epochs + 0.01)
    assert epochs == pytest.approx(14.31)
    assert plan_epochs(1200, fixed, {"net": WORK}, {"net": SPEED})["net"] == pytest.approx(32.31)  # twice the budget


def test_the_plan_keeps_the_ratio_of_the_backbones_epochs():
    slow = dataclasses.replace(WORK, epochs=5)  # params: half the epochs of `fast`
    speeds = {"fast": SPEED, "slow": Speed(train=50.0, infer=500.0)}
    epochs = plan_epochs(3600, {}, {"fast": WORK, "slow": slow}, speeds)
    assert epochs["fast"] > 10 and epochs["slow"] == pytest.approx(epochs["fast"] / 2, abs=0.011)
    total = train_seconds(WORK, speeds["fast"], epochs["fast"]) + train_seconds(slow, speeds["slow"], epochs["slow"])
    assert total <= 3600


def test_a_budget_too_small_for_one_epoch_names_the_minimum():
    fixed = {"prepare": 120.0}
    one_epoch = train_seconds(WORK, SPEED, 1)
    minimum = math.ceil((120 + one_epoch) / (1 - MARGIN) / 6) / 10  # in minutes, rounded up to a tenth
    with pytest.raises(PipelineError, match=rf"budget.minutes: 2 is too small .* at least {minimum:g} minutes"):
        plan_epochs(120, fixed, {"net": WORK}, {"net": SPEED})
    assert plan_epochs(minimum * 60, fixed, {"net": WORK}, {"net": SPEED})["net"] >= 1
    with pytest.raises(PipelineError):
        plan_epochs(minimum * 60 - 7, fixed, {"net": WORK}, {"net": SPEED})


def test_the_plan_adds_up_its_stages():
    plan = make_plan(30, 1500, {"net": WORK}, {"net": SPEED}, {"prepare": 20.0, "plan": 15.0})
    stages = plan["planned_seconds"]
    assert set(stages) >= {"prepare", "plan", "train@net", "predict@net", "ensemble", "analyze", "timing", "dvc"}
    assert stages["predict@net"] == pytest.approx(STAGE_OVERHEAD_S + 3000 / 1000, abs=0.1)
    assert (
        sum(stages.values()) == pytest.approx(plan["planned_total_seconds"], abs=1)
        and plan["planned_total_seconds"] <= 1800
    )
    assert plan["backbones"]["net"]["epochs"] > 10 and plan["backbones"]["net"]["val_every"] == math.ceil(
        plan["backbones"]["net"]["epochs"]
    )


def test_a_refit_counts_in_the_plan_and_leaves_the_folds_fewer_epochs():
    """Two refit models on all 1,500 rows for (at most) the folds' epochs, and their test predictions."""
    refit = dataclasses.replace(WORK, refit_fits=2, refit_rows=1500, refit_predict_images=2 * 500 * 2)
    fixed = {"prepare": 60.0}
    alone, with_refit = (plan_epochs(900, fixed, {"net": w}, {"net": SPEED})["net"] for w in (WORK, refit))
    # an epoch: 3 folds x 1,000 rows + 2 refits x 1,500 rows = twice the images of the folds alone
    assert with_refit == pytest.approx(alone / 2, abs=0.3)  # less the refit stage's start and predictions
    plan = make_plan(30, 1500, {"net": refit}, {"net": SPEED}, {})
    epochs, stages = plan["backbones"]["net"]["epochs"], plan["planned_seconds"]
    assert stages["refit@net"] == pytest.approx(refit_seconds(refit, SPEED, epochs), abs=0.1)
    assert stages["refit@net"] > 2 * epochs * 1500 / 100 and plan["planned_total_seconds"] <= 1800
    assert make_plan(30, 1500, {"net": WORK}, {"net": SPEED}, {})["planned_seconds"]["refit@net"] == IDLE_STAGE_S


def test_under_refit_replace_the_fold_models_predict_their_oof_rows_alone():
    data = SimpleNamespace(train=[0] * 900, n_folds=3, test=[0] * 100, holdout=[0] * 50)
    both = backbone_work(data, TrainSettings(), 2, refit_models=1, refit_views=2)
    oof = backbone_work(data, TrainSettings(), 2, refit_models=1, refit_views=2, bag_test=False)
    assert both.predict_images == 2 * (900 + 3 * 150) and oof.predict_images == 2 * 900
    assert oof.refit_predict_images == both.refit_predict_images == 150 * 2 and oof.refit_rows == 900


def test_the_tta_choice_on_select_rows_plans_every_other_prediction_at_the_chosen_policys_views():
    """6 candidate views on the 200 OOF rows the choice is made on, at most 2 (the chosen policy's) on the other
    700 and the 450 test and holdout predictions: 1,200 + 2,300 images, where every view everywhere is 8,100."""
    data = SimpleNamespace(train=[0] * 900, n_folds=3, test=[0] * 100, holdout=[0] * 50)
    every = backbone_work(data, TrainSettings(), 6)
    chosen = backbone_work(data, TrainSettings(), 6, chosen_views=2, select_rows=200)
    assert every.predict_images == 6 * (900 + 3 * 150)
    assert chosen.predict_images == 6 * 200 + 2 * (700 + 3 * 150)
    assert backbone_work(data, TrainSettings(), 6, chosen_views=2, select_rows=5000).predict_images == 6 * 900 + 2 * 450


def _schemes(k: int, refit: bool = False) -> dict[int, dict]:
    """The fake machine's work for m = k..1 folds of a k-fold split of 1,500 rows, 100 test rows, 2 views."""
    data = SimpleNamespace(train=[0] * 1500, n_folds=k, test=[0] * 100, holdout=None)
    s = TrainSettings(epochs=10, val_every=10)
    work = lambda m: backbone_work(data, s, 2, refit_models=int(refit), refit_views=2, folds=m)  # noqa: E731
    return {m: {"net": work(m)} for m in range(k, 0, -1)}


def test_the_plan_trains_fewer_folds_on_a_shorter_budget_and_a_single_split_on_a_tiny_one():
    """cv.train_folds: auto on a hand-made speed table: the most folds whose models all get params' 10 epochs,
    else the fewest. An epoch of 3 folds is 3 x 1,000 rows / 100 per s = 30 s, of 2 folds 20 s, of 1 fold 10 s."""
    k = 3
    rows = {m: 500 * m for m in range(1, k + 1)}
    folds = {
        minutes: plan_scheme(minutes, rows, _schemes(k), {"net": SPEED}, {})["scheme"]["folds"]
        for minutes in (8, 5.5, 3, 1.5)
    }
    assert folds == {8: 3, 5.5: 2, 3: 1, 1.5: 1}  # 8 minutes: 3 folds x 12.67 epochs fit; 5.5: 8.17 at 3, 12.41 at 2
    tiny = plan_scheme(1.5, rows, _schemes(k), {"net": SPEED}, {})
    assert tiny["backbones"]["net"]["folds"] == 1 and 1 <= tiny["backbones"]["net"]["epochs"] < 10
    assert "fewest" in tiny["scheme"]["reason"] and tiny["scheme"]["of"] == 3
    more = plan_scheme(8, rows, _schemes(k), {"net": SPEED}, {})["backbones"]["net"]
    assert more["folds"] == 3 and more["epochs"] >= 10
    assert plan_scheme(7, rows, _schemes(k), {"net": SPEED}, {})["scheme"]["folds"] == 3
    # a refit on all 1,500 rows counts in every scheme: 7 minutes give 3 folds 7.11 epochs, 2 folds 9.22, 1 fold 13.03
    assert plan_scheme(7, rows, _schemes(k, refit=True), {"net": SPEED}, {})["scheme"]["folds"] == 1
    with pytest.raises(PipelineError, match="too small for one epoch"):  # not even one fold fits: the minimum named
        plan_scheme(0.2, rows, _schemes(k), {"net": SPEED}, {})


def test_refit_auto_refits_one_fold_where_every_model_gets_its_epochs_and_not_on_a_short_budget():
    """refit.enabled: auto on the hand-made table: one fold (1,000 rows) and a refit (1,500 rows) make an epoch
    of 25 s. 8 minutes give each about 16 epochs (>= params' 10): one fold, then the refit; 3 minutes about 5:
    no refit, and the scheme is what cv.train_folds: auto makes without one."""
    k = 3
    rows = {m: 500 * m for m in range(1, k + 1)}

    def choose(minutes: float) -> dict:
        without = plan_scheme(minutes, rows, _schemes(k), {"net": SPEED}, {})
        refit = lambda: make_plan(minutes, rows[1], _schemes(k, refit=True)[1], {"net": SPEED}, {})  # noqa: E731
        return plan_refit(without, refit, 1)

    long, short = choose(8), choose(3)
    assert long["scheme"]["refit"] is True and long["backbones"]["net"]["refit"] is True
    assert long["scheme"]["folds"] == 1 and long["backbones"]["net"]["folds"] == 1
    assert long["backbones"]["net"]["epochs"] >= 10 and "refit@net" in long["planned_seconds"]
    assert long["planned_seconds"]["refit@net"] > 10 * 1500 / 100  # 10+ epochs of 1,500 rows at 100 images/s
    assert short["scheme"]["refit"] is False and short["backbones"]["net"]["refit"] is False
    assert (
        short["planned_seconds"]["refit@net"] == IDLE_STAGE_S
        and "less than its params epochs" in (short["scheme"]["refit_reason"])
    )
    # without the refit, 8 minutes would have bagged all 3 folds; with it the submission is the refit's
    assert plan_scheme(8, rows, _schemes(k), {"net": SPEED}, {})["scheme"]["folds"] == 3
    # a budget where the refit scheme has not one epoch: no refit, and the reason says so
    refit_tiny = lambda: make_plan(0.3, rows[1], _schemes(k, refit=True)[1], {"net": SPEED}, {})  # noqa: E731
    with pytest.raises(PipelineError, match="too small for one epoch"):
        refit_tiny()
    tiny = plan_refit(plan_scheme(8, rows, _schemes(k), {"net": SPEED}, {}), refit_tiny, 1)
    assert tiny["scheme"]["refit"] is False and "not one epoch fits" in tiny["scheme"]["refit_reason"]


def test_refit_auto_is_planned_from_params_and_read_back_by_the_later_stages(tmp_path):
    """plan_from_speeds with refit.enabled: auto writes `refit` per backbone; RefitConfig.planned reads it; without
    a budget auto is no refit."""
    data = SimpleNamespace(train=[0] * 1500, n_folds=3, folds=np.arange(1500) % 3, test=[0] * 100, holdout=None)

    def params(minutes):
        raw = {"train": {"backbones": {"net": {}}, "epochs": 10, "val_every": 10}, "tta": {"candidates": ["none"]}}
        return parse_params(
            {**raw, "cv": {"train_folds": "auto"}, "refit": {"enabled": "auto"}, "budget": {"minutes": minutes}}
        )

    def plan(minutes):
        p = params(minutes)
        backbone = Backbone("net", "test_resnet", None, resolve_train_settings(p.train, "net"), 32, {})
        return plan_from_speeds(p, data, {"net": backbone}, {"net": SPEED}, {})

    long, short = plan(8), plan(3)
    assert (long["backbones"]["net"]["refit"], short["backbones"]["net"]["refit"]) == (True, False)
    assert "refit on (auto: 1 fold(s) and the refit get" in plan_choices(long["backbones"]["net"])["text"]  # the report
    assert "refit off (auto: with 1 fold(s) and the refit" in plan_choices(short["backbones"]["net"])["text"]
    backbone = Backbone("net", "test_resnet", None, resolve_train_settings(params(None).train, "net"), 32, {})
    assert no_budget(data, {"net": backbone}, torch.device("cpu"), 3, "auto")["backbones"]["net"]["refit"] is False
    assert long["backbones"]["net"]["folds"] == 1
    (tmp_path / "net.json").write_text(json.dumps({"epochs": 16, "refit": True}))
    assert params(8).refit.planned(tmp_path, "net").enabled is True
    assert params(8).refit.planned(tmp_path, "net").replaces_fold_bags is True
    with pytest.raises(PipelineError, match="refit.planned"):
        _ = params(8).refit.replaces_fold_bags  # auto, unread: no stage may guess it
    with pytest.raises(PipelineError, match=r"other\.json: no refit for refit\.enabled: auto"):
        params(8).refit.planned(tmp_path, "other")


def test_under_a_short_budget_the_plan_drops_tta_where_that_buys_enough_epochs_and_predict_follows(tmp_path):
    """3 folds of 1,000 training rows at 100 images/s; TTA candidates none and airbench (6 views). With 3,000 test
    rows at 200 inference images/s the views cost most of 3 minutes: without them the model gets 9.5x the epochs,
    so no TTA. With 100 test rows at 1,000 images/s they cost little (2 minutes): TTA kept, the reason says why.
    Past params' epochs (8 minutes) nothing is dropped and the plan says nothing of TTA."""

    def plan(minutes: float, test_rows: int, infer: float, select="auto") -> dict:
        data = SimpleNamespace(
            train=[0] * 1500, n_folds=3, folds=np.arange(1500) % 3, test=[0] * test_rows, holdout=None
        )
        raw = {"train": {"backbones": {"net": {}}, "epochs": 10, "val_every": 10}, "cv": {"train_folds": "auto"}}
        p = parse_params(
            {**raw, "tta": {"select": select, "candidates": ["none", "airbench"]}, "budget": {"minutes": minutes}}
        )
        backbone = Backbone("net", "test_resnet", None, resolve_train_settings(p.train, "net"), 32, {})
        return plan_from_speeds(p, data, {"net": backbone}, {"net": Speed(100.0, infer)}, {})["backbones"]["net"]

    costly, cheap, long = plan(3, 3000, 200.0), plan(2, 100, 1000.0), plan(8, 3000, 200.0)
    assert costly["tta"] == "none" and "(at least 1.25x: no TTA)" in costly["tta_reason"]
    found = re.search(
        r"without TTA the models get net ([\d.]+) epochs, with it net ([\d.]+) \(at least", costly["tta_reason"]
    )
    without, with_views = map(float, found.groups())
    assert costly["epochs"] == without > 1.25 * with_views and with_views < 2  # 9.78 epochs against 1.03
    assert cheap["tta"] == "auto" and cheap["tta_reason"].endswith("TTA kept)") and cheap["epochs"] < 10
    assert "tta" not in long and long["epochs"] >= 10
    assert "tta" not in plan(3, 3000, 200.0, select="airbench")  # a policy set in params stays
    # the predict stage reads the plan's choice: none for `net`, its params for any other backbone
    (tmp_path / "net.json").write_text(json.dumps({"epochs": costly["epochs"], "tta": costly["tta"]}))
    tta = parse_params({"tta": {"candidates": ["none", "airbench"]}}).tta
    assert tta.planned(tmp_path, "net").policies_for("net") == (["none"], ["none"])
    assert tta.planned(tmp_path, "other") == tta and tta.views_computed("net") == 6


def test_the_fold_models_of_a_scheme_predict_their_own_rows_and_the_test_set():
    data = SimpleNamespace(train=[0] * 900, n_folds=3, test=[0] * 100, holdout=[0] * 50)
    one = backbone_work(data, TrainSettings(), 2, folds=1)
    assert (one.fits, one.predict_images, one.folds) == (1, 2 * (300 + 150), 1)  # fold 0's 300 OOF rows
    assert backbone_work(data, TrainSettings(), 2).fits == 3


def test_the_planned_epochs_move_the_schedule_with_them():
    s = TrainSettings(epochs=10, val_every=10, mixup_off_epoch=8, warmup_epochs=1.0)
    planned = apply_plan(s, {"epochs": 20, "val_every": 20})
    assert (planned.epochs, planned.val_every, planned.mixup_off_epoch, planned.warmup_epochs) == (20, 20, 16, 1.0)
    assert apply_plan(s, {"epochs": 10, "val_every": 10}) == s
    # validating every 2nd of 10 epochs stays every 2nd: only "the last epoch only" follows the epochs
    plan = make_plan(30, 1500, {"n": dataclasses.replace(WORK, val_every=2)}, {"n": SPEED}, {})
    assert plan["backbones"]["n"]["epochs"] > 10 and plan["backbones"]["n"]["val_every"] == 2


def test_the_speed_probe_shrinks_with_the_budget_between_its_floor_and_probe_batches():
    # the warm-up pass ran 1,000 images/s at batch 100; budget.probe_batches 150
    at = lambda minutes, most=150: probe_batches(minutes and minutes * 60, 1000.0, 100, most)  # noqa: E731
    scaled = math.floor(PROBE_BUDGET_SHARE * 5 * 60 * 1000 / 100)  # 5 minutes: that share of it
    assert PROBE_MIN_BATCHES < scaled < 150 and at(5) == scaled
    assert at(60) == 150 and at(None) == 150  # a long budget, or none: probe_batches
    assert at(0.5) == PROBE_MIN_BATCHES  # a tiny one: the floor, below which a pass measures too little
    assert at(60, most=2) == 2 and at(0.5, most=2) == 2  # never more than probe_batches


@pytest.mark.training
def test_a_budget_plans_the_epochs_training_runs_and_timing_sets_actual_beside_planned(tmp_path, monkeypatch, capsys):
    """Through the stages' own commands: plan measures this machine, train runs the planned epochs
    (not params'), and the timing stage reports planned and actual seconds per stage."""
    write_competition(tmp_path / "comp", n_per_class=8, n_test=6)
    params = {
        "competition": {"source": "comp"},
        "prepare": {"image_size": 12, "workers": 1},
        "cv": {"n_folds": 2},
        "train": {"backbones": {"b": {"model": "test_resnet"}}, "epochs": 1000, "batch_size": 4},
        "budget": {"minutes": 0.05, "probe_batches": 2},
        "tracking": {"enabled": False},
    }
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert cli.main(["prepare"]) == 0

    def write_minutes(minutes: float) -> None:
        params["budget"]["minutes"] = minutes
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    # 3 seconds: too small, the error names the minimum; then 12 s more than one epoch per fold needs: a few epochs
    minutes = plan_just_over_the_minimum(write_minutes, capsys)
    planned = json.loads((tmp_path / "plan/b.json").read_text())
    assert 1 <= planned["epochs"] < 1000 and planned["val_every"] == 1
    assert json.loads((tmp_path / "reports/plan.json").read_text())["backbones"]["b"]["probe_batches"] == 2
    assert cli.main(["train", "--backbone", "b"]) == 0
    resolved = yaml.safe_load((tmp_path / "models/b/params.yaml").read_text())["resolved"]
    assert resolved["epochs"] == planned["epochs"]
    assert cli.main(["timing"]) == 0
    report = json.loads((tmp_path / "reports/timing.json").read_text())
    for stage in ("prepare", "plan", "train@b"):
        assert report["stages"][stage]["planned_s"] is not None and report["stages"][stage]["actual_s"] is not None
    assert report["stages"]["predict@b"]["actual_s"] is None  # not run here
    assert report["planned_total_seconds"] <= minutes * 60
