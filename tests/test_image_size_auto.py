"""`train.image_size: auto`: the plan picks the input side among a few candidates at or below the cache's and the
images' median native side (pipeline/plan.py, `side_candidates`): the largest at which every model gets its
params epochs (from SIDE_EPOCHS_SHARE of them), else the smallest; without a budget the largest. The train stage
trains at the side chosen."""

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import plan as plan_module
from pipeline.analyze import plan_choices
from pipeline.backbone import Backbone, planned
from pipeline.config import ConfigError, parse_params, resolve_train_settings
from pipeline.errors import PipelineError
from pipeline.plan import SIDE_EPOCHS_SHARE, Speed, plan_from_speeds, side_candidates, speeds_by_side
from pipeline.report import next_steps_section
from pipeline.tasks import create_task
from tests.conftest import plan_just_over_the_minimum, write_competition
from tests.test_holdout import _stages

CLASSES = [str(c) for c in range(10)]
# a hand-made machine: each side's speed from 0.2 ms per image plus 1.1 us per pixel (about 100 images/s at 96 px)
SIDES = (96, 72, 48)
TABLE = {side: Speed(1 / (2e-4 + 1.1e-6 * side**2), 10 / (2e-4 + 1.1e-6 * side**2)) for side in SIDES}


def _data(cache: int = 96, native: float | None = 100.0, per_class: int = 300, k: int = 3) -> SimpleNamespace:
    """A prepared competition as the plan reads it: `per_class` rows of 10 classes, a cache of `cache` px,
    images of a `native` px median short side (None: sizes not recorded)."""
    labels = np.repeat(CLASSES, per_class)
    return SimpleNamespace(
        train=pd.DataFrame({"label": labels}),
        train_images=np.zeros((len(labels), cache, cache, 3), dtype=np.uint8),
        native_side=lambda: native,
        n_folds=k,
        folds=np.arange(len(labels)) % k,
        test=[0] * 100,
        holdout=None,
        task=create_task("single_label", CLASSES),
    )


def _params(minutes: float | None, finetune: str = "full", pretrained=None):
    entry = {} if pretrained is None else {"pretrained": pretrained}
    train = {"backbones": {"net": entry}, "image_size": "auto", "finetune": finetune, "epochs": 10, "batch_size": 32}
    return parse_params({"train": train, "tta": {"candidates": ["none"]}, "budget": {"minutes": minutes}})


def _backbone(params) -> Backbone:
    entry = params.train.backbones["net"]
    return Backbone("net", "test_resnet", entry.pretrained, resolve_train_settings(params.train, "net"), 96, {})


def test_candidates_sit_at_or_below_the_cache_and_for_random_weights_the_native_side():
    auto = _backbone(_params(None))
    assert side_candidates(_data(96, 100.0), auto) == [96, 72, 48]  # the cache is the smaller
    assert side_candidates(_data(128, 100.0), auto) == [100, 72, 48]  # the images are: a larger input shows nothing
    assert side_candidates(_data(64, 32.0), auto) == [32, 24, 16]  # upsampled into the cache: the files' 32 px
    assert side_candidates(_data(64, None), auto) == [64, 48, 32]  # sizes not recorded: the cache's
    assert side_candidates(_data(16, 16.0), auto) == [16]  # nothing under MIN_SIDE
    fixed = _backbone(parse_params({"train": {"backbones": {"net": {}}, "image_size": 64}}))
    assert side_candidates(_data(), fixed) == []
    pretrained = _backbone(_params(None, pretrained="weights.pth"))  # ImageNet's object scale: no native cap
    assert side_candidates(_data(96, 32.0), pretrained) == [96, 72, 48]
    assert (
        side_candidates(_data(96, 100.0), pretrained) == [96, 72, 48]
        and side_candidates(_data(128, 100.0), pretrained)[0] == 128
    )


def test_speeds_between_two_measured_sides_follow_a_per_image_and_a_per_pixel_cost():
    measured = {96: TABLE[96], 48: TABLE[48]}
    between = speeds_by_side(measured, list(SIDES))
    assert between[72].train == pytest.approx(TABLE[72].train, rel=1e-9)
    assert between[72].infer == pytest.approx(TABLE[72].infer, rel=1e-9)
    assert between[96].train == pytest.approx(TABLE[96].train, rel=1e-9)
    # one side measured: per pixel alone
    assert speeds_by_side({96: TABLE[96]}, [48])[48].train == pytest.approx(4 * TABLE[96].train)


@pytest.mark.parametrize(
    ("minutes", "side", "enough"),
    [(20, 96, True), (9, 72, True), (4.5, 48, True), (2, 48, False)],
)
def test_the_plan_steps_the_side_down_as_the_budget_shrinks(minutes, side, enough):
    """3 fold models of 2,000 training rows: an epoch of all three takes about 62 s at 96 px, 37 s at 72 and 18 s
    at 48, so 20 minutes give 96 px its 10 epochs, 9 minutes only 72 px, 4.5 minutes only 48 px, and 2 minutes none."""
    params = _params(minutes)
    entry = plan_from_speeds(params, _data(), {"net": _backbone(params)}, {"net": TABLE}, {})["backbones"]["net"]
    assert entry["image_size"] == side
    assert (entry["epochs"] >= 10) == enough
    reason = entry["image_size_reason"]
    assert reason.startswith("the largest side at which" if enough else "no side gives every model")
    assert "cache's side, 96 px" in reason and "native side (100 px)" in reason


def test_a_side_short_of_its_epochs_by_less_than_the_estimates_error_still_counts(monkeypatch):
    """12 minutes give 96 px 9.13 of its 10 epochs: within SIDE_EPOCHS_SHARE (the plan's epochs are estimates),
    so 96 px stays; a hard threshold (share 1) would drop to 72 px."""
    params = _params(12)
    plan = lambda: plan_from_speeds(params, _data(), {"net": _backbone(params)}, {"net": TABLE}, {})  # noqa: E731
    entry = plan()["backbones"]["net"]
    assert entry["image_size"] == 96 and SIDE_EPOCHS_SHARE * 10 <= entry["epochs"] < 10
    assert "from 85% of them" in entry["image_size_reason"]
    monkeypatch.setattr(plan_module, "SIDE_EPOCHS_SHARE", 1.0)
    assert plan()["backbones"]["net"]["image_size"] == 72


def test_features_take_the_largest_side_and_the_train_stage_reads_the_choice(tmp_path):
    """finetune: auto at 4.5 minutes: as full, 48 px buys 11.3 epochs (700 updates per fold model: full); at 1.3
    minutes 1.2 epochs (77 updates: features+sklearn), one pass over the rows: at the largest side."""
    data = _data()
    fast = _params(4.5, finetune="auto", pretrained="weights.pth")
    entry = plan_from_speeds(fast, data, {"net": _backbone(fast)}, {"net": TABLE}, {})["backbones"]["net"]
    assert (entry["finetune"], entry["image_size"]) == ("full", 48)
    short = _params(1.3, finetune="auto", pretrained="weights.pth")
    entry = plan_from_speeds(short, data, {"net": _backbone(short)}, {"net": TABLE}, {})["backbones"]["net"]
    assert (entry["finetune"], entry["image_size"]) == ("features+sklearn", 96)
    assert entry["image_size_reason"].startswith("features+sklearn: one pass")
    (tmp_path / "net.json").write_text(json.dumps({"epochs": 10, "val_every": 1, "image_size": 72}))
    chosen = planned(_backbone(_params(9)), tmp_path)
    assert (chosen.settings.image_size, chosen.image_size, chosen.input_side) == (72, 72, 72)


def test_auto_without_a_plan_entry_or_with_tuning_or_a_bad_value_is_one_line(tmp_path):
    (tmp_path / "net.json").write_text(json.dumps({"epochs": 10, "val_every": 10}))  # a plan of before auto
    with pytest.raises(PipelineError, match="no image_size for train.image_size: auto"):
        planned(_backbone(_params(None)), tmp_path, budget=False)
    with pytest.raises(PipelineError, match=r"net\.json: not found; train\.image_size: auto needs the plan stage"):
        planned(_backbone(_params(None)), tmp_path / "none", budget=False)
    with pytest.raises(ConfigError, match="backbones.net: image_size: auto is chosen by the plan stage, after tune"):
        parse_params({"train": {"backbones": {"net": {}}, "image_size": "auto"}, "tune": {"enabled": True}})
    with pytest.raises(ConfigError, match="image_size must be >= 1, auto or null"):
        parse_params({"train": {"backbones": {"net": {"image_size": "big"}}}})


PARAMS = """
competition: {{source: data/raw/comp}}
prepare: {{image_size: 48, workers: 1}}
cv: {{n_folds: 2}}
train:
  backbones: {{test_resnet: {{}}}}
  image_size: auto
  epochs: {epochs}
  batch_size: 4
tta: {{candidates: [none]}}
tracking: {{enabled: false}}
budget: {{minutes: {minutes}, probe_batches: 2}}
"""


@pytest.mark.training
@pytest.mark.parametrize("budget", [False, True])
def test_the_train_stage_trains_at_the_side_the_plan_chose(tmp_path, capsys, monkeypatch, budget):
    """32 px images upsampled into a 48 px cache (where a set image_size: null trains at 48): candidates 32, 24 and
    16. Without a budget the largest; with one a few seconds over what one epoch needs, and 1,000 params
    epochs that no side gets, the smallest, after probing 32 and 16 px."""
    write_competition(tmp_path / "data/raw/comp", n_per_class=12, n_test=6, size=32)
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.format(minutes="null", epochs=2))
    _stages(tmp_path, [["prepare"]])
    side, reason = 32, "no budget (budget.minutes: null): the largest of 32/24/16 px"
    if budget:
        monkeypatch.chdir(tmp_path)
        plan_just_over_the_minimum(
            lambda minutes: params.write_text(PARAMS.format(minutes=minutes, epochs=1000)), capsys
        )
        side, reason = 16, "no side gives every model its params epochs (1000), the smallest the most"
    _stages(tmp_path, ([] if budget else [["plan"]]) + [["train", "--backbone", "test_resnet"]])
    entry = json.loads((tmp_path / "reports/plan.json").read_text())["backbones"]["test_resnet"]
    assert entry["image_size"] == side and entry["image_size_reason"].startswith(reason)
    assert json.loads((tmp_path / "plan/test_resnet.json").read_text())["image_size"] == side
    assert json.loads((tmp_path / "reports/train/test_resnet.json").read_text())["input_size"] == side
    fold = next((tmp_path / "models/test_resnet").glob("seed*/fold0"))
    assert torch.load(fold / "model.pt", weights_only=True)["image_size"] == side


def test_the_report_says_what_the_plan_chose_and_why():
    entry = {"epochs": 3, "image_size": 24, "image_size_reason": "the largest side at which ...", "finetune": "full"}
    entry["finetune_reason"] = "random weights: their frozen features carry nothing"
    step = plan_choices(entry)
    assert step["kind"] == "plan" and (step["image_size"], step["finetune"]) == (24, "full")
    assert step["text"].startswith("Plan: image_size 24 (auto: the largest side at which ...); finetune full")
    assert plan_choices({"epochs": 3, "val_every": 3}) is None and plan_choices(None) is None  # nothing left to it
    model = SimpleNamespace(ensemble=False, name="net", anchor="m-net", next_steps=[step])
    assert "Plan: image_size 24" in next_steps_section([model])
