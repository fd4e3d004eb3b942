import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.__main__ import main as cli_main
from pipeline.config import (
    PROXY_METRIC,
    ConfigError,
    TrainConfig,
    flatten,
    load_params,
    parse_params,
    resolve_train_settings,
    to_dict,
)
from pipeline.predict import select_policy
from pipeline.tasks.single_label import SingleLabel

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_load_and_override_defaults():
    params = load_params(ROOT / "params.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    # every value written in params.yaml is the value the code sees
    resolved = flatten(to_dict(params))
    for key, value in flatten(raw).items():  # a metric left null: the competition's for the ensemble, else the proxy
        if value is None and key.endswith(("monitor", "metric")):
            value = params.competition.metric if key == "ensemble.metric" else PROXY_METRIC
        assert resolved[key] == value, key


def test_defaults_match_shipped_params():
    """The typed defaults and params.yaml describe the same default run, but for the digits demo's epoch and TTA
    choice on accuracy (what chose them before the proxy; its submission stays byte-identical)."""
    demo = {"train": {"monitor": "accuracy"}, "tta": {"metric": "accuracy"}}
    assert to_dict(load_params(ROOT / "params.yaml")) == to_dict(parse_params(demo))
    assert parse_params({}).train.monitor == parse_params({}).tta.metric == "log_loss"


@pytest.mark.parametrize("metric", ["macro_f1", "roc_auc", "log_loss"])
def test_null_choice_metrics_take_the_proxy_and_the_ensemble_the_competitions_metric(metric):
    """Pointed at another competition with the choice metrics left null, the smooth proxy (log loss) picks the
    epoch, the trial and the TTA policy, and the competition's metric the ensemble: the two TTA policies below
    are ranked one way by log loss and the other by macro F1 and accuracy."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"]["monitor"] = raw["tta"]["metric"] = None
    params = parse_params({**raw, "competition": {**raw["competition"], "metric": metric}})
    assert (params.train.monitor, params.tune.metric, params.tta.metric) == ("log_loss",) * 3
    assert params.ensemble.metric == metric
    y = np.tile([0, 1, 2, 3], 25)
    folds = np.arange(100) % 5
    hedged = np.full((100, 4), 0.1)  # argmax right on 60 rows (0.7 there), 0.25 everywhere else: low log loss
    hedged[np.arange(60), y[:60]] = 0.7
    hedged[60:] = 0.25
    bold = np.full((100, 4), 0.001 / 3)  # argmax right on 90 rows (0.999), confidently wrong on 10: high log loss
    bold[np.arange(90), y[:90]] = 0.999
    bold[np.arange(90, 100), (y[90:] + 1) % 4] = 0.999
    oofs, task = {"none": hedged, "hflip": bold}, SingleLabel(["0", "1", "2", "3"])
    assert select_policy(oofs, y, folds, params.tta.metric, task)[0] == "none"
    # set, accuracy wins, and ranks them the other way
    assert select_policy(oofs, y, folds, "accuracy", task)[0] == "hflip"


def test_null_metrics_take_the_proxy_and_explicit_ones_win():
    p = parse_params(
        {
            "competition": {"metric": "roc_auc"},
            "tta": {"metric": "log_loss"},
            "train": {"backbones": {"a": {}, "b": {"monitor": "accuracy"}}},
        }
    )
    assert (p.train.monitor, p.tune.metric, p.tta.metric, p.ensemble.metric) == (
        "log_loss",
        "log_loss",
        "log_loss",
        "roc_auc",
    )
    assert resolve_train_settings(p.train, "a").monitor == "log_loss"
    assert resolve_train_settings(p.train, "b").monitor == "accuracy"


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"params.yaml: unknown key 'train.lrr'"):
        load_params(path)


def test_unknown_backbone_override_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown key 'train.backbones.resnet18.learning_rate'"):
        parse_params({"train": {"backbones": {"resnet18": {"learning_rate": 1}}}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"'train.epochs' must be int, got 'ten'"):
        parse_params({"train": {"epochs": "ten"}})
    with pytest.raises(ConfigError, match=r"'cv.n_folds' must be int, got True"):
        parse_params({"cv": {"n_folds": True}})


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"tta": {"merge": "median"}}, "'tta.merge' must be one of ['mean', 'geometric', 'logits'], got 'median'"),
        (
            {"tune": {"metric": "auc"}},
            "'tune.metric' must be one of ['accuracy', 'log_loss', 'macro_f1', 'roc_auc', "
            "'quadratic_weighted_kappa', 'f_beta', 'micro_f1', 'mean_column_auc', 'rmse', 'mae'], got 'auc'",
        ),
        ({"prepare": {"image_size": 0}}, "prepare.image_size must be >= 1, got 0"),
        ({"train": {"image_size": 0, "backbones": {"b": {}}}}, "train.backbones.b.image_size must be >= 1"),
        ({"train": {"backbones": {"b": {"lr": -0.01}}}}, "train.backbones.b.lr must be >= 0, got -0.01"),
        ({"train": {"epochs": 0, "backbones": {"b": {}}}}, "train.backbones.b.epochs must be >= 1, got 0"),
        (
            {"train": {"label_smoothing": 1.0, "backbones": {"b": {}}}},
            "train.backbones.b.label_smoothing must be in [0, 1)",
        ),
        (
            {"train": {"ema_decay": 1.5, "backbones": {"b": {}}}},
            "train.backbones.b.ema_decay must be in (0, 1), got 1.5",
        ),
        ({"prepare": {"resize": "stretch"}}, "'prepare.resize' must be one of ['squash', 'pad', 'center_crop']"),
        ({"train": {"backbones": {"b": {"finetune": "lora"}}}}, "'train.backbones.b.finetune' must be one of"),
        # cross-field rules, each checked once here so that no stage checks them again
        (
            {"train": {"mixup_alpha": 0.4, "batch_size": 3, "backbones": {"b": {}}}},
            "train.backbones.b.batch_size must be even with mixup/cutmix, got 3",
        ),
        ({"tune": {"folds": [0, 7]}}, "tune.folds: fold 7 does not exist (cv.n_folds=5)"),
        (
            {"tune": {"space": {"epochs": {"type": "int", "low": 1, "high": 3}}}},
            "tune.space.epochs: set by the tune stage",
        ),
        ({"tune": {"backbones": {"nope": {}}}}, "tune.backbones.nope is not a key of train.backbones"),
        ({"ensemble": {"weights": {"resnet10t": -1}}}, "ensemble.weights must be non-negative with a positive sum"),
    ],
)
def test_a_value_outside_its_choices_is_named_when_params_are_read(raw, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_params(raw)


def test_yaml_exponent_strings_are_floats():
    assert parse_params({"train": {"lr": "1e-3"}}).train.lr == pytest.approx(1e-3)


def test_empty_backbone_entry_means_all_defaults():
    params = parse_params({"train": {"backbones": {"resnet18": None}}})
    assert list(params.train.backbones) == ["resnet18"]
    assert params.train.backbones["resnet18"].lr is None


def test_cli_reports_unknown_key_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("competition:\n  sorce: x\n")
    assert cli_main(["prepare"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: params.yaml: unknown key 'competition.sorce'"]
    assert not (tmp_path / "data").exists()


def test_dvc_train_stage_declares_every_train_key_it_reads():
    """DVC reruns train@<backbone> only for the params it declares: all of TrainConfig's must be there."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for stage in ("tune", "train"):
        entries = dvc["stages"][stage]["do"]["params"]
        declared = {k for e in entries for k in (e["params.yaml"] if isinstance(e, dict) else [e])}
        for name in TrainConfig.__dataclass_fields__:  # TrainSettings fields + backbones
            key = "train.backbones.${key}" if name == "backbones" else f"train.{name}"
            assert key in declared, (stage, key)


def test_class_imbalance_remedies_are_tunable_choices():
    p = parse_params(
        {
            "train": {"backbones": {"b": {}}},
            "tune": {
                "space": {
                    "class_weight": {"type": "categorical", "choices": ["none", "balanced"]},
                    "sampler": {"type": "categorical", "choices": ["uniform", "balanced"]},
                }
            },
        }
    )
    assert set(p.tune.space) == {"class_weight", "sampler"}
    with pytest.raises(ConfigError, match=r"train.backbones.b.class_weight' must be one of \['none', 'balanced'\]"):
        parse_params({"train": {"backbones": {"b": {"class_weight": "auto"}}}})


def test_pretrained_is_true_or_a_path_and_mean_goes_with_std():
    p = parse_params(
        {
            "train": {
                "backbones": {
                    "hub": {"pretrained": True, "model": "convnext_tiny.fb_in22k"},
                    "file": {"pretrained": "exports/b/model.pt"},
                    "scratch": {},
                }
            }
        }
    )
    assert [p.train.backbones[b].pretrained for b in ("hub", "file", "scratch")] == [True, "exports/b/model.pt", None]
    with pytest.raises(ConfigError, match=r"train.backbones.b: set mean and std together, or neither"):
        parse_params({"train": {"mean": [0.5, 0.5, 0.5], "backbones": {"b": {}}}})
    with pytest.raises(
        ConfigError, match=r"train.backbones.b.feature_layer is for finetune: features\+sklearn, not full"
    ):
        parse_params({"train": {"feature_layer": "layer2", "backbones": {"b": {}}}})
    backbones = {"i": {"feature_layer": -2}, "n": {"feature_layer": "layer2"}}
    layers = parse_params({"train": {"finetune": "features+sklearn", "backbones": backbones}})
    assert [layers.train.backbones[b].feature_layer for b in "in"] == [-2, "layer2"]  # an index stays an int
    with pytest.raises(ConfigError, match=r"train.backbones.b.std must be 3 numbers \(one per RGB channel, each > 0\)"):
        parse_params({"train": {"mean": [0.5] * 3, "std": [0.2, 0.0, 0.2], "backbones": {"b": {}}}})
