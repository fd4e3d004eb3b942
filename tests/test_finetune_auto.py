"""`train.finetune: auto`: the plan picks features+sklearn or full fine-tuning from the updates each fold
model gets and the rows of its median class (pipeline/plan.py, `choose_finetune`), under a budget from the
planned epochs, without one from params.yaml's; the train stage trains what the plan chose."""

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.backbone import Backbone, planned, resolve_backbone
from pipeline.config import ConfigError, load_params, parse_params, resolve_train_settings
from pipeline.data import load_prepared
from pipeline.errors import PipelineError
from pipeline.metrics import is_better
from pipeline.models import create_model
from pipeline.plan import (
    COMPARE_PARTS,
    ROWS_PER_CLASS_FOR_FULL,
    UPDATES_FOR_FULL,
    Speed,
    choose_finetune,
    plan_from_speeds,
    plan_measuring_regimes,
)
from pipeline.tasks import create_task
from tests.conftest import write_competition
from tests.test_holdout import _stages

CLASSES = [str(c) for c in range(10)]
SPEED = {"net": Speed(train=100.0, infer=1000.0)}  # a hand-made machine: 100 training images/s


def _data(per_class: int, k: int = 3) -> SimpleNamespace:
    """A prepared competition as the plan reads it: `per_class` rows of each of 10 classes, k folds, 100 test rows."""
    labels = np.repeat(CLASSES, per_class)
    return SimpleNamespace(
        train=pd.DataFrame({"label": labels}),
        n_folds=k,
        folds=np.arange(len(labels)) % k,
        test=[0] * 100,
        holdout=None,
        task=create_task("single_label", CLASSES),
    )


def _params(minutes: float | None, pretrained="weights.pth"):
    entry = {} if pretrained is None else {"pretrained": pretrained}
    return parse_params(
        {
            "train": {"backbones": {"net": entry}, "finetune": "auto", "epochs": 10, "batch_size": 32},
            "tta": {"candidates": ["none"]},
            "budget": {"minutes": minutes},
        }
    )


def _backbone(params) -> Backbone:
    entry = params.train.backbones["net"]
    return Backbone("net", "test_resnet", entry.pretrained, resolve_train_settings(params.train, "net"), 32, {})


def test_the_rule_takes_full_from_enough_updates_and_rows_per_class_and_features_below():
    data = _data(300)  # a fold model trains on 2,000 rows: 62 updates of 32 an epoch, 200 rows per class
    backbone = _backbone(_params(None))
    edge = UPDATES_FOR_FULL / 62
    below, above = choose_finetune(data, backbone, edge - 0.2), choose_finetune(data, backbone, edge + 0.2)
    assert (below["finetune"], above["finetune"]) == ("features+sklearn", "full")
    assert "200 training rows in the median class" in below["finetune_reason"]
    # as many updates, but a median class under ROWS_PER_CLASS_FOR_FULL: frozen features still
    few = _data(60)  # 40 rows per class in a fold model's training part
    assert 60 * 2 / 3 < ROWS_PER_CLASS_FOR_FULL
    assert choose_finetune(few, backbone, 10 * edge)["finetune"] == "features+sklearn"
    # random weights: full at any budget
    scratch = _backbone(_params(None, pretrained=None))
    assert choose_finetune(data, scratch, 0.5)["finetune"] == "full"
    assert choose_finetune(data, scratch, 0.5)["finetune_reason"].startswith("random weights")
    # finetune set in params: nothing chosen
    assert choose_finetune(data, _backbone(parse_params({"train": {"backbones": {"net": {}}}})), 1.0) == {}


def test_the_plan_picks_features_on_a_short_budget_and_full_on_a_long_one(tmp_path):
    """3 fold models of 2,000 training rows at 100 images/s: an epoch of all three is 60 s, so 3 minutes
    give them about 1.7 epochs (105 updates each) and 20 minutes 16.3 (1,010 updates)."""
    data = _data(300)
    short = plan_from_speeds(_params(3), data, {"net": _backbone(_params(3))}, SPEED, {})["backbones"]["net"]
    long = plan_from_speeds(_params(20), data, {"net": _backbone(_params(20))}, SPEED, {})["backbones"]["net"]
    assert short["finetune"] == "features+sklearn" and long["finetune"] == "full"
    assert long["epochs"] * 62 >= UPDATES_FOR_FULL and long["epochs"] > 5
    assert short["epochs"] == 10  # planned again as one fit: params' epochs stand, nothing to scale
    # the plan's entry is what the train stage reads: features+sklearn for the short budget's backbone
    (tmp_path / "net.json").write_text(json.dumps({k: short[k] for k in ("epochs", "val_every", "finetune")}))
    assert planned(_backbone(_params(3)), tmp_path).settings.finetune == "features+sklearn"


def test_auto_without_a_plan_file_or_with_tuning_is_one_line(tmp_path):
    with pytest.raises(PipelineError, match=r"net\.json: not found; train\.finetune: auto needs the plan stage"):
        planned(_backbone(_params(None)), tmp_path, budget=False)
    (tmp_path / "net.json").write_text(json.dumps({"epochs": 10, "val_every": 10}))  # a plan of before auto
    with pytest.raises(PipelineError, match="no finetune for train.finetune: auto"):
        planned(_backbone(_params(None)), tmp_path, budget=False)
    with pytest.raises(ConfigError, match="backbones.net: finetune: auto is chosen by the plan stage, after tune"):
        parse_params({"train": {"backbones": {"net": {}}, "finetune": "auto"}, "tune": {"enabled": True}})


PARAMS = """
competition: {{source: data/raw/comp}}
prepare: {{image_size: 12, workers: 1}}
cv: {{n_folds: 2}}
train:
  backbones: {{test_resnet: {{{pretrained}}}}}
  finetune: auto
  epochs: 2
  batch_size: 4
tta: {{candidates: [none]}}
tracking: {{enabled: false}}
"""


@pytest.mark.training
@pytest.mark.parametrize("weights", [True, False])
def test_without_a_budget_auto_follows_params_epochs(tmp_path, weights):
    """budget.minutes: null (the README): the rule at train.epochs. 2 epochs of 18 rows at batch 4 are 8
    updates: features+sklearn with pretrained weights, full from random ones."""
    write_competition(tmp_path / "data/raw/comp", n_per_class=12, n_test=6)
    pretrained = ""
    if weights:
        torch.manual_seed(0)
        torch.save(create_model("test_resnet", num_classes=7).state_dict(), tmp_path / "weights.pth")
        pretrained = "pretrained: weights.pth"
    (tmp_path / "params.yaml").write_text(PARAMS.format(pretrained=pretrained))
    _stages(tmp_path, [["prepare"], ["plan"], ["train", "--backbone", "test_resnet"]])
    chosen = "features+sklearn" if weights else "full"
    assert json.loads((tmp_path / "plan/test_resnet.json").read_text())["finetune"] == chosen
    entry = json.loads((tmp_path / "reports/plan.json").read_text())["backbones"]["test_resnet"]
    assert entry["finetune"] == chosen and entry["finetune_reason"]
    fold = next((tmp_path / "models/test_resnet").glob("seed*/fold0"))
    assert (fold / "classifier.skops").exists() == weights  # the head fitted on frozen features, or none


def _prepared_with_weights(tmp_path, n_per_class: int = 12):
    """A prepared 3-class competition (2 folds) and pretrained test_resnet weights for it."""
    write_competition(tmp_path / "data/raw/comp", n_per_class=n_per_class, n_test=6)
    torch.manual_seed(0)
    torch.save(create_model("test_resnet", num_classes=7).state_dict(), tmp_path / "weights.pth")
    (tmp_path / "params.yaml").write_text(PARAMS.format(pretrained="pretrained: weights.pth"))
    _stages(tmp_path, [["prepare"]])
    return load_prepared(tmp_path / "data/prepared")


def test_the_inner_split_is_fold_0s_training_rows_alone(tmp_path):
    data = _prepared_with_weights(tmp_path, n_per_class=20)
    inner = data.inner(0, COMPARE_PARTS)
    assert list(inner.train["id"]) == list(data.train["id"][data.folds != 0])  # never fold 0's own rows
    assert set(inner.folds) == set(range(COMPARE_PARTS))
    held = set(pd.read_csv(tmp_path / "data/prepared/holdout.csv")["id"]) if data.holdout is not None else set()
    assert not held & set(inner.train["id"])
    assert np.array_equal(np.asarray(inner.train_images), np.asarray(data.train_images)[data.folds != 0])


@pytest.mark.training
def test_where_the_budget_allows_the_regimes_are_measured_and_the_better_one_is_planned(tmp_path, monkeypatch):
    """A hand-made machine (10 training images/s) and the real comparison: at 3 minutes the plan with full
    fine-tuning keeps train.epochs after paying for it, so both regimes train on fold 0's inner split and the
    plan takes the better; at the smallest budget that fits train.epochs the rule decides alone."""
    data = _prepared_with_weights(tmp_path)
    monkeypatch.chdir(tmp_path)
    params = load_params("params.yaml")
    params = dataclasses.replace(params, budget=dataclasses.replace(params.budget, minutes=3))
    backbones = {"test_resnet": resolve_backbone(params, "test_resnet", 12, "params.yaml", tmp_path / "tuning")}
    speeds = {"test_resnet": Speed(train=10.0, infer=100.0)}
    plan = plan_measuring_regimes(params, data, backbones, speeds, lambda: {"plan": 0.0}, torch.device("cpu"))
    entry = plan["backbones"]["test_resnet"]
    c = entry["finetune_comparison"]
    assert c["train_rows"] + c["val_rows"] == int((data.folds != 0).sum()) and c["val_rows"] < c["train_rows"]
    assert c["epochs"] >= 2 and entry["finetune"] in ("full", "features+sklearn")
    if c["full"] != c["features+sklearn"]:  # the better measured score (train.monitor's) is the regime planned
        better = is_better(c["monitor"], c["full"], c["features+sklearn"])
        assert entry["finetune"] == ("full" if better else "features+sklearn")
    assert entry["finetune_reason"].startswith("measured on an inner split of fold 0's training rows")
    # the rule alone (18 rows per fold model: features+sklearn) where the comparison does not fit
    # 1.13 minutes: train.epochs fit (1.1 is the least this table allows), the comparison's seconds beside them not
    short = dataclasses.replace(params, budget=dataclasses.replace(params.budget, minutes=1.13))
    plan = plan_measuring_regimes(short, data, backbones, speeds, lambda: {"plan": 0.0}, torch.device("cpu"))
    entry = plan["backbones"]["test_resnet"]
    assert "finetune_comparison" not in entry and entry["finetune"] == "features+sklearn"
    assert "not measured: a comparison" in entry["finetune_reason"]


def test_a_class_too_small_for_the_inner_split_leaves_the_choice_to_the_rule():
    data = _data(6)  # 4 rows of each class in fold 0's training part: under COMPARE_PARTS, a part would have none
    params = _params(20)
    plan = plan_measuring_regimes(params, data, {"net": _backbone(params)}, SPEED, lambda: {"plan": 0.0}, None)
    entry = plan["backbones"]["net"]
    assert "finetune_comparison" not in entry
    assert "not measured: a class under 5 training rows" in entry["finetune_reason"]
