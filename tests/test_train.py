"""The training loop on real tiny timm models, with a real MLflow store in tmp_path."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from mlflow.tracking import MlflowClient
from timm.data import Mixup

from pipeline import __main__ as cli
from pipeline import loop
from pipeline import precision as precision_module
from pipeline.analyze import fold_scores
from pipeline.backbone import Backbone, input_size
from pipeline.config import TrainSettings
from pipeline.data import (
    GPU_IMAGES_PER_S,
    InputConfig,
    Rows,
    build_train_transform,
    default_num_workers,
    load_prepared,
    resize_batch,
    to_input,
)
from pipeline.errors import PipelineError
from pipeline.fold import bootstrap_rows, initial_model, train_fold
from pipeline.inference import load_fold_model, predict
from pipeline.loop import (
    LRSchedule,
    Split,
    build_optimizer,
    derive_seed,
    epoch_batches,
    fit,
    freeze,
    train_one_epoch,
)
from pipeline.models import check_backbone, create_model, pretrained_config
from pipeline.precision import resolve_precision
from pipeline.predict import predict_backbone
from pipeline.prepare import prepare
from pipeline.sklearn_head import load_classifier
from pipeline.tasks.single_label import SingleLabel, log_loss
from pipeline.tracking import Tracker
from pipeline.train import train_backbone

pytestmark = pytest.mark.training  # trains or tunes: CI runs these again on another instruction set

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
SETTINGS = TrainSettings(
    epochs=4,
    batch_size=4,
    lr=1e-2,
    weight_decay=0.0,
    warmup_epochs=0.5,
    augment=[{"HorizontalFlip": {"p": 0.5}}],
    seed=0,
)
OFF = Tracker(False, "off")
TASK3 = SingleLabel(["0", "1", "2"])  # the tests' three classes, as the loop and inference take them


def _fit(model, images, targets, val_images, val_targets, mean, std, s, image_size, device, n_classes, **kwargs):
    """The loop on explicit rows, as a fold of these tests feeds it, for a single-label task of `n_classes`."""
    cfg = InputConfig(image_size, tuple(mean), tuple(std), precision=s.precision)
    task = SingleLabel([str(c) for c in range(n_classes)])
    return fit(model, Split(images, targets), Split(val_images, val_targets), cfg, s, device, task=task, **kwargs)


def _backbone(model_name, s, image_size, pretrained=None, name="b") -> Backbone:
    """A backbone resolved by hand, its weights' data config resolved as `resolve_backbone` does."""
    return Backbone(name, model_name, pretrained, s, image_size, {}, pretrained_config(model_name, pretrained))


def _bag(data, name, model_name, s, image_size, out_dir, device, tracker, pretrained=None, resume_dir=None):
    """`train_backbone` of a backbone resolved by hand."""
    backbone = _backbone(model_name, s, image_size, pretrained, name)
    return train_backbone(data, backbone, out_dir, device, tracker, resume_dir=resume_dir)


@pytest.fixture
def prepared(comp_config, tmp_path):
    prepare(comp_config, image_size=16, n_folds=2, seed=0, out_dir=tmp_path / "prepared", workers=1)
    return load_prepared(tmp_path / "prepared")


def _fold0(data):
    folds, y = data.train["fold"].to_numpy(), data.train["target"].to_numpy()
    tr, va = folds != 0, folds == 0
    mean, std = data.fold_stats(0)
    return np.asarray(data.train_images[tr]), y[tr], np.asarray(data.train_images[va]), y[va], mean, std


def _batches(data, size=4, n=3):
    images = torch.from_numpy(np.asarray(data.train_images[: size * n]))
    targets = torch.from_numpy(data.train["target"].to_numpy()[: size * n])
    return [(images[i : i + size], targets[i : i + size]) for i in range(0, size * n, size)]


def _one_epoch(model, batches, s: TrainSettings, mean=(0.5,) * 3, std=(0.25,) * 3, **kwargs):
    optimizer = build_optimizer(model, s)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    kwargs.setdefault("task", TASK3)
    return train_one_epoch(
        model, batches, optimizer, scheduler, CPU, InputConfig(16, tuple(mean), tuple(std)), **kwargs
    ), optimizer


def test_cv_training_writes_oof_checkpoints_and_an_mlflow_tree(prepared, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(True, "unit", uri=uri)
    with tracker.run("test_resnet", params={"backbone": "test_resnet"}):  # 8 epochs: learnt on every CPU tried
        oof, metrics = _bag(
            prepared,
            "test_resnet",
            "test_resnet",
            dataclasses.replace(SETTINGS, epochs=8),
            16,
            tmp_path / "models",
            CPU,
            tracker,
        )

    targets = prepared.train["target"].to_numpy()
    assert oof.shape == (24, 3)
    np.testing.assert_allclose(oof.sum(1), 1.0, atol=1e-5)  # every row filled by its fold's model
    assert metrics["oof"]["accuracy"] == pytest.approx(float((oof.argmax(1) == targets).mean()))
    # colour-coded classes: learnt, not chance (1/3); 0.83 or more over 12 seeds x 3 instruction sets
    assert metrics["oof"]["accuracy"] > 0.5
    table = fold_scores(oof, targets, prepared.train["fold"].to_numpy(), TASK3)
    assert metrics["fold_std"]["log_loss"] > 0  # one spread for both reports: the sample std (ddof=1)
    assert metrics["fold_std"]["log_loss"] == pytest.approx(table.loc["std", "log_loss"], rel=1e-9)
    for k in range(2):
        ckpt = torch.load(tmp_path / "models" / "seed0" / f"fold{k}" / "model.pt", weights_only=True)
        assert ckpt["model"] == "test_resnet" and ckpt["num_classes"] == 3
        assert ckpt["mean"] == prepared.fold_stats(k)[0]  # normalised with its own training part

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("unit")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(parent) == 1 and parent[0].data.params["backbone"] == "test_resnet"
    assert sorted(r.info.run_name for r in children) == ["fold0", "fold1"]
    history = client.get_metric_history(children[0].info.run_id, "val_accuracy")
    assert [m.step for m in history] == list(range(8))  # one point per epoch
    assert "best_accuracy" in children[0].data.metrics


def test_two_seeded_runs_give_identical_oof(prepared, tmp_path):
    s = dataclasses.replace(SETTINGS, epochs=2, mixup_alpha=0.4, drop_rate=0.2)
    a, _ = _bag(prepared, "b", "test_efficientnet", s, 16, tmp_path / "a", CPU, OFF)
    b, _ = _bag(prepared, "b", "test_efficientnet", s, 16, tmp_path / "b", CPU, OFF)
    np.testing.assert_array_equal(a, b)
    c, _ = _bag(prepared, "b", "test_efficientnet", dataclasses.replace(s, seed=1), 16, tmp_path / "c", CPU, OFF)
    assert not np.array_equal(a, c)


def test_a_resumed_fold_equals_an_uninterrupted_one(prepared, tmp_path):
    data = _fold0(prepared)
    s = dataclasses.replace(SETTINGS, epochs=3, ema_decay=0.9)

    torch.manual_seed(0)
    whole = _fit(create_model("test_resnet", 3), *data, s, 16, CPU, 3)

    class Killed(Exception):
        pass

    def kill_after_second_epoch(epoch, row):
        if epoch == 1:
            raise Killed

    state = tmp_path / "fold0.state.pt"
    torch.manual_seed(0)
    with pytest.raises(Killed):
        _fit(create_model("test_resnet", 3), *data, s, 16, CPU, 3, on_epoch=kill_after_second_epoch, state_path=state)
    assert torch.load(state, weights_only=True)["epoch"] == 1  # tensors and plain values: nothing unpickled
    torch.manual_seed(123)  # a new process: different initial weights, which the checkpoint replaces
    resumed = _fit(create_model("test_resnet", 3), *data, s, 16, CPU, 3, state_path=state)
    assert len(resumed.history) == 3
    np.testing.assert_array_equal(resumed.val_probs, whole.val_probs)
    for key, value in whole.state_dict.items():
        torch.testing.assert_close(resumed.state_dict[key], value, rtol=0, atol=0)


def test_fractional_epochs_train_their_share_of_batches_and_resume_exactly_after_a_kill(
    prepared, tmp_path, monkeypatch
):
    """epochs 2.5: two whole passes and half of a third, the LR schedule spanning the 2.5; killed after the
    second epoch, the run resumes to the very weights of an uninterrupted one."""
    data = _fold0(prepared)
    s = dataclasses.replace(SETTINGS, epochs=2.5, ema_decay=0.9, val_every=1)
    n_batches = len(data[0]) // s.batch_size  # drop_last: whole batches only
    last = round(2.5 * n_batches) - 2 * n_batches
    assert 0 < last < n_batches  # a part of the third pass
    steps, updates, step = [], [], loop._step
    monkeypatch.setattr(loop, "_step", lambda *a: (updates.append(1), step(*a)))  # counts optimizer updates
    torch.manual_seed(0)
    whole = _fit(create_model("test_resnet", 3), *data, s, 16, CPU, 3, on_epoch=lambda e, row: steps.append(row))
    assert len(updates) == 2 * n_batches + last
    assert [round(r["epochs_done"] * n_batches) for r in steps] == [n_batches, 2 * n_batches, 2 * n_batches + last]
    assert steps[-1]["lr"] < steps[1]["lr"] and len(whole.history) == 3

    class Killed(Exception):
        pass

    def kill_after_second_epoch(epoch, row):
        if epoch == 1:
            raise Killed

    state = tmp_path / "fold0.state.pt"
    torch.manual_seed(0)
    with pytest.raises(Killed):
        _fit(create_model("test_resnet", 3), *data, s, 16, CPU, 3, on_epoch=kill_after_second_epoch, state_path=state)
    torch.manual_seed(123)
    resumed = _fit(create_model("test_resnet", 3), *data, s, 16, CPU, 3, state_path=state)
    assert [r["epochs_done"] for r in resumed.history] == [r["epochs_done"] for r in whole.history]
    np.testing.assert_array_equal(resumed.val_probs, whole.val_probs)
    for key, value in whole.state_dict.items():
        torch.testing.assert_close(resumed.state_dict[key], value, rtol=0, atol=0)


def test_the_progress_line_counts_a_fractional_last_epoch_as_its_share(prepared, tmp_path, capsys):
    """2 folds x 2.5 epochs: 5 epochs of work, the third pass of each fold counting a half (so the ETA of a short
    last epoch is short), not 2 x 3 whole ones."""
    s = dataclasses.replace(SETTINGS, epochs=2.5, val_every=3)  # validated after the last pass only: it is kept
    _, metrics = _bag(prepared, "b", "test_resnet", s, 16, tmp_path / "models", CPU, OFF)
    # the kept weights' epochs as the refit reads them: the part-pass's batches (2.5 x 3 batches round to 8 of
    # 9 here), not 3 whole epochs
    assert all(2 < f["best_epoch"] < 3 for f in metrics["folds"].values()), metrics["folds"]
    out = capsys.readouterr().out
    lines = re.findall(r"^train@b: ([\d.]+)/([\d.]+) epochs \((\d+)%\)", out, re.M)
    assert [(float(d), float(t), int(p)) for d, t, p in lines] == [
        (1, 5, 20),
        (2, 5, 40),
        (2.5, 5, 50),
        (3.5, 5, 70),
        (4.5, 5, 90),
        (5, 5, 100),
    ]
    # each fold's own epoch lines count the same way: its third pass ends at 2.5 of 2.5, not 3 of 3
    passes = re.findall(r"fold (\d) epoch ([\d.]+)/([\d.]+): train_loss", out)
    assert passes == [(k, d, "2.5") for k in "01" for d in ("1", "2", "2.5")]


def test_epoch_batches_splits_a_fractional_run_into_whole_passes_and_a_part():
    assert epoch_batches(3, 10) == [10, 10, 10]
    assert epoch_batches(2.5, 10) == [10, 10, 5]
    assert epoch_batches(0.04, 10) == [1]  # at least one batch
    assert epoch_batches(1.96, 10) == [10, 10]


def test_freeze_keeps_frozen_stages_fixed_until_unfreeze(prepared):
    torch.manual_seed(0)
    model = create_model("test_resnet", 3)
    names = freeze(model, -1)
    assert names and not any("fc." in n for n in names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bn_before = model.bn1.running_mean.clone() if hasattr(model, "bn1") else None
    _one_epoch(model, _batches(prepared), SETTINGS)
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in names)
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    if bn_before is not None:  # frozen batch-norm statistics stay put too
        assert torch.equal(bn_before, model.bn1.running_mean)


def test_freeze_first_stage_only(prepared):
    model = create_model("test_resnet", 3)
    names = freeze(model, 1)
    assert any(n.startswith("layer1.") for n in names) and not any(n.startswith("layer2.") for n in names)


def test_unfreeze_epoch_trains_the_backbone_again(prepared):
    data = _fold0(prepared)
    # val_every = epochs keeps the last epoch's weights: which epoch validates best is no part of this test
    s = dataclasses.replace(SETTINGS, epochs=2, finetune="freeze", unfreeze_epoch=1, val_every=2)
    torch.manual_seed(0)
    model = create_model("test_resnet", 3)
    stem = model.state_dict()["layer1.0.conv1.weight"].clone()
    result = _fit(model, *data, s, 16, CPU, 3)
    assert not torch.equal(result.state_dict["layer1.0.conv1.weight"], stem)
    torch.manual_seed(0)  # the same start without unfreezing: the stage never moves
    frozen_run = _fit(create_model("test_resnet", 3), *data, dataclasses.replace(s, unfreeze_epoch=None), 16, CPU, 3)
    assert torch.equal(frozen_run.state_dict["layer1.0.conv1.weight"], stem)


def test_linear_probe_trains_only_the_head(prepared):
    data = _fold0(prepared)
    torch.manual_seed(0)
    model = create_model("test_resnet", 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = _fit(model, *data, dataclasses.replace(SETTINGS, epochs=1, finetune="linear_probe"), 16, CPU, 3)
    changed = {k for k, v in result.state_dict.items() if v.dtype.is_floating_point and not torch.equal(v, before[k])}
    assert changed == {"fc.weight", "fc.bias"}


@pytest.mark.parametrize("layer, channels", [(None, 96), ("layer2", 48), (1, 32)])
def test_features_sklearn_gives_oof_and_a_predictable_checkpoint(prepared, tmp_path, layer, channels):
    s = dataclasses.replace(SETTINGS, finetune="features+sklearn", feature_layer=layer)  # test_resnet's stages
    oof, metrics = _bag(prepared, "b", "test_resnet", s, 16, tmp_path / "models", CPU, OFF)
    np.testing.assert_allclose(oof.sum(1), 1.0, atol=1e-6)
    assert metrics["oof"]["accuracy"] > 0.7  # logistic regression on colour features
    assert load_classifier(tmp_path / "models/seed0/fold1/classifier.skops").n_features_in_ == channels
    model, ckpt = load_fold_model(tmp_path / "models" / "seed0" / "fold1" / "model.pt", CPU)
    assert ckpt["feature_layer"] == layer  # inference takes the features from the same stage
    folds = prepared.train["fold"].to_numpy()
    again = predict(model, prepared.train_images[folds == 1], InputConfig.from_checkpoint(ckpt), 8, CPU, task=TASK3)
    np.testing.assert_allclose(again, oof[folds == 1], atol=1e-6)


class _Planted:  # a pickle that runs code when loaded, as one dropped into a shared models folder would
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_an_unknown_feature_layer_is_one_line_naming_the_stages(prepared):
    s = dataclasses.replace(SETTINGS, finetune="features+sklearn", feature_layer="layer9")
    with pytest.raises(
        PipelineError,
        match="train.feature_layer: 'layer9' is not a stage of the model "
        r"\(its stages: act1, layer1, layer2, layer3, layer4\)",
    ):
        train_fold(prepared, 0, _backbone("test_resnet", s, 16), CPU)
    with pytest.raises(PipelineError, match="train.feature_layer: 5 is out of the model's 5 stages"):
        train_fold(prepared, 0, _backbone("test_resnet", dataclasses.replace(s, feature_layer=5), 16), CPU)


def test_nothing_in_a_fold_folder_is_unpickled_and_resume_states_load_weights_only(prepared, tmp_path):
    import pickle

    import skops.io

    s = dataclasses.replace(SETTINGS, finetune="features+sklearn")
    oof, _ = _bag(prepared, "b", "test_resnet", s, 16, tmp_path / "models", CPU, OFF, resume_dir=tmp_path / "resume")
    for done in sorted((tmp_path / "resume" / "seed0").glob("fold*.done.pt")):  # a finished fold, kept
        assert torch.load(done, weights_only=True)["checkpoint"]["sklearn_head"]
    fold = tmp_path / "models" / "seed0" / "fold1"
    marker = tmp_path / "code-ran"
    for name in ("classifier.joblib", "classifier.pkl"):
        (fold / name).write_bytes(pickle.dumps(_Planted(marker)))
    model, ckpt = load_fold_model(fold / "model.pt", CPU)
    assert not marker.exists()
    folds = prepared.train["fold"].to_numpy()
    again = predict(model, prepared.train_images[folds == 1], InputConfig.from_checkpoint(ckpt), 8, CPU, task=TASK3)
    np.testing.assert_allclose(again, oof[folds == 1], atol=1e-6)
    # a resumed run takes its finished folds from the resume folder, through the same safe loaders
    again_oof, _ = _bag(
        prepared, "b", "test_resnet", s, 16, tmp_path / "models2", CPU, OFF, resume_dir=tmp_path / "resume"
    )
    np.testing.assert_array_equal(again_oof, oof)

    skops.io.dump({"head": _Planted(marker)}, fold / "classifier.skops")  # a head naming a foreign type
    with pytest.raises(PipelineError, match=r"classifier\.skops: refusing to load .*_Planted"):
        load_fold_model(fold / "model.pt", CPU)
    assert not marker.exists()


def test_layer_decay_gives_deeper_layers_smaller_learning_rates():
    model = create_model("test_resnet", 3)
    s = dataclasses.replace(SETTINGS, layer_decay=0.5, lr=1.0)
    optimizer = build_optimizer(model, s)
    LRSchedule(optimizer, dataclasses.replace(s, warmup_epochs=0), 10)  # timm's schedule applies lr_scale
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert lr_of[id(params["fc.weight"])] == pytest.approx(1.0)
    assert lr_of[id(params["conv1.0.weight"])] < lr_of[id(params["layer2.0.conv1.weight"])] < 1.0


def _lrs(s: TrainSettings, updates_per_epoch: int, n: int, resume_at: int | None = None) -> list[float]:
    """The lr of the first param group before each of `n` updates; with `resume_at`, the schedule's
    state is saved there and loaded into a fresh optimizer and schedule, as a resumed fold does."""
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, s)
    schedule = LRSchedule(optimizer, s, updates_per_epoch)
    seen = []
    for update in range(n):
        if update == resume_at:
            state = schedule.state_dict()
            optimizer = build_optimizer(model, s)
            schedule = LRSchedule(optimizer, s, updates_per_epoch)
            schedule.load_state_dict(state)
        seen.append(optimizer.param_groups[0]["lr"])
        schedule.step()
    return seen


def test_schedules_are_timms_after_linear_warmup_and_resume_on_the_same_curve():
    s = dataclasses.replace(SETTINGS, lr=1.0, epochs=6, warmup_epochs=1.0, weight_decay=0.0)
    cosine = _lrs(dataclasses.replace(s, scheduler="cosine"), 2, 13)  # 2 warmup updates, then 10 of cosine
    assert cosine[0] == pytest.approx(0.5) and cosine[2] == pytest.approx(1.0)
    assert cosine[7] == pytest.approx(0.5) and cosine[12] == pytest.approx(0.0, abs=1e-12)
    linear = _lrs(dataclasses.replace(s, scheduler="linear", min_lr=0.1), 2, 13)
    assert linear[7] == pytest.approx(0.55) and linear[12] == pytest.approx(0.1)
    step = _lrs(dataclasses.replace(s, scheduler="step", step_epochs=1.5, step_gamma=0.1), 2, 9)
    assert step[2:9] == pytest.approx([1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.01])
    assert _lrs(dataclasses.replace(s, scheduler="constant"), 2, 13)[2:] == pytest.approx([1.0] * 11)
    for kind in ("cosine", "linear", "step"):
        k = dataclasses.replace(s, scheduler=kind)
        assert _lrs(k, 2, 13, resume_at=5) == _lrs(k, 2, 13)  # exact, not approximately
    assert len(set(_lrs(dataclasses.replace(s, epochs=1), 2, 3))) == 3  # all warmup: still a schedule


def test_gradient_accumulation_matches_one_big_batch(prepared):
    s = dataclasses.replace(SETTINGS, optimizer="momentum", lr=0.1, momentum=0.0)
    batches = _batches(prepared, size=4, n=2)
    big = [(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))]
    torch.manual_seed(0)
    a = create_model("test_vit", 3)  # layer norm only: micro-batches see the same normalisation
    b = create_model("test_vit", 3)
    b.load_state_dict(a.state_dict())
    _one_epoch(a, big, s)
    _one_epoch(b, batches, s, accum_steps=2)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5, msg=name)


def test_gradient_clipping_bounds_the_update(prepared):
    s = dataclasses.replace(SETTINGS, optimizer="momentum", lr=1.0, momentum=0.0)
    torch.manual_seed(0)
    model = create_model("test_vit", 3)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    _one_epoch(model, _batches(prepared, n=1), s, clip_grad_norm=1e-3)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert 0 < (after - before).norm() <= 1e-3 * 1.0001


def test_mixup_and_label_smoothing_change_the_loss(prepared):
    batches = _batches(prepared, n=1)
    s = dataclasses.replace(SETTINGS, lr=0.0)
    losses = {}
    for name, kwargs in {
        "plain": {},
        "smooth": {"label_smoothing": 0.3},
        "mixup": {"mixup": Mixup(mixup_alpha=1.0, num_classes=3, label_smoothing=0.0)},
    }.items():
        torch.manual_seed(0)
        model = create_model("test_vit", 3)
        losses[name], _ = _one_epoch(model, batches, s, **kwargs)
    assert losses["smooth"] != pytest.approx(losses["plain"])
    assert losses["mixup"] != pytest.approx(losses["plain"])


def test_mixup_switches_off_at_its_epoch(prepared):
    images, targets, val_images, val_targets, mean, std = _fold0(prepared)  # 12 rows: 3 full batches of 4
    s = dataclasses.replace(SETTINGS, epochs=2, lr=0.0, augment=[], mixup_alpha=1.0, mixup_off_epoch=1)
    torch.manual_seed(0)
    model = create_model("test_vit", 3)  # no dropout or batch norm: with lr 0 the function stays fixed
    result = _fit(model, images, targets, val_images, val_targets, mean, std, s, 16, CPU, 3)
    with torch.no_grad():
        x = (
            torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)
        ) / torch.tensor(std).view(1, 3, 1, 1)
        plain = torch.nn.functional.cross_entropy(model(x), torch.from_numpy(targets)).item()
    assert result.history[1]["train_loss"] == pytest.approx(plain, rel=1e-4)  # epoch 2: no mixing
    assert result.history[0]["train_loss"] != pytest.approx(plain, rel=1e-3)  # epoch 1: mixed


def test_ema_weights_differ_from_live_weights_and_the_better_one_is_kept(prepared):
    data = _fold0(prepared)
    s = dataclasses.replace(SETTINGS, epochs=2, ema_decay=0.5)
    from timm.utils import ModelEmaV3

    from pipeline.loop import _best_candidate, evaluate

    torch.manual_seed(0)
    model = create_model("test_resnet", 3)
    ema = ModelEmaV3(model, decay=0.5)
    _one_epoch(model, _batches(prepared), s, ema=ema)
    assert not torch.equal(ema.module.state_dict()["fc.weight"], model.state_dict()["fc.weight"])
    # the choice between them: whichever validates better (log loss breaks an accuracy tie; live wins a full tie)
    val = Split(data[2], data[3])
    cfg = InputConfig(16, tuple(data[4]), tuple(data[5]))
    live, averaged = (evaluate(m, val, cfg, 8, CPU, TASK3)[0] for m in (model, ema.module))
    chosen = _best_candidate("accuracy", [(model, live, None), (ema.module, averaged, None)])[0]
    ema_better = (averaged["accuracy"], -averaged["log_loss"]) > (live["accuracy"], -live["log_loss"])
    assert chosen is (ema.module if ema_better else model)
    flipped = _best_candidate("accuracy", [(model, {**live, "accuracy": 0.0}, None), (ema.module, averaged, None)])
    assert flipped[0] is ema.module  # live weights that validate worse lose to the average
    result = _fit(create_model("test_resnet", 3), *data, s, 16, CPU, 3)
    assert {row["ema_chosen"] for row in result.history} <= {0.0, 1.0} and len(result.history) == 2


def test_early_stopping_ends_a_fold_without_improvement(prepared):
    data = _fold0(prepared)
    s = dataclasses.replace(SETTINGS, epochs=6, lr=0.0, early_stopping_patience=1, monitor="log_loss")
    torch.manual_seed(0)
    result = _fit(create_model("test_vit", 3), *data, s, 16, CPU, 3)  # no batch-norm statistics to drift
    assert len(result.history) == 2  # best at epoch 1, then one epoch without improvement


def test_non_finite_loss_names_backbone_fold_epoch_step_and_lr(prepared):
    data = _fold0(prepared)
    model = create_model("test_resnet", 3)
    with torch.no_grad():
        model.fc.weight.fill_(float("nan"))
    with pytest.raises(PipelineError, match=r"^resnet fold 0, epoch 1, step 1: loss is nan \(lr [0-9.e-]+\)"):
        _fit(model, *data, SETTINGS, 16, CPU, 3, where="resnet fold 0")


def test_augmentation_comes_from_config():
    t = build_train_transform([{"HorizontalFlip": {"p": 1.0}}], seed=0)
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    np.testing.assert_array_equal(t(image=image)["image"], image[:, ::-1])
    never = build_train_transform([{"HorizontalFlip": {"p": 1.0}}], seed=0, p=0.0)  # augment_p: strength
    np.testing.assert_array_equal(never(image=image)["image"], image)
    pad_crop = build_train_transform(
        [{"PadIfNeeded": {"min_height": 6, "min_width": 6}}, {"RandomCrop": {"height": 2, "width": 3}}], seed=0, p=0.5
    )
    assert {pad_crop(image=image)["image"].shape for _ in range(20)} == {(2, 3, 3)}  # applied together or not
    with pytest.raises(PipelineError, match=r"train.augment\[0\]: 'Flipz' is not an albumentations transform"):
        build_train_transform([{"Flipz": {}}], seed=0)
    with pytest.raises(PipelineError, match=r"train.augment\[0\] HorizontalFlip: unknown argument 'q'"):
        build_train_transform([{"HorizontalFlip": {"q": 1}}], seed=0)
    with pytest.raises(PipelineError, match=r"train.augment\[1\] HorizontalFlip"):
        build_train_transform([{"VerticalFlip": {}}, {"HorizontalFlip": {"p": 2}}], seed=0)


def test_oneof_and_other_compositions_build_through_albumentations_and_replay_from_their_record():
    import albumentations as A

    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    one_of = [
        {"OneOf": {"transforms": [{"HorizontalFlip": {"p": 1.0}}, {"VerticalFlip": {"p": 1.0}}], "p": 1.0}},
        {"RandomCrop": {"height": 2, "width": 2}},
    ]  # p left out: the class's own (1.0), not from_dict's 0.5
    t = build_train_transform(one_of, seed=0)
    outs = {t(image=image)["image"].tobytes() for _ in range(40)}
    flips = {a[:, :2].tobytes() for a in (image[:, ::-1], image[::-1])} | {
        a[:, 1:].tobytes() for a in (image[:, ::-1], image[::-1])
    }
    assert outs <= flips and len(outs) >= 2  # always one of the two flips, then always cropped
    replay = A.from_dict(A.to_dict(t))  # the record train writes (augment.json) builds the same pipeline
    assert A.to_dict(replay) == A.to_dict(t)
    with pytest.raises(PipelineError, match=r"train.augment\[0\].transforms\[1\]: 'Flipz' is not an albumentations"):
        build_train_transform([{"OneOf": {"transforms": [{"HorizontalFlip": {}}, {"Flipz": {}}]}}], seed=0)
    with pytest.raises(PipelineError, match=r"train.augment\[0\] OneOf: needs transforms"):
        build_train_transform([{"OneOf": {"p": 0.5}}], seed=0)


def test_default_augmentation_follows_the_cache_size_and_a_shrinking_one_is_refused():
    rng = np.random.default_rng(0)
    image = rng.integers(1, 256, (64, 64, 3), dtype=np.uint8)
    shift = build_train_transform(None, seed=0, cache_size=64, image_size=48)  # train.augment: null
    outs = [shift(image=image)["image"] for _ in range(20)]
    assert {o.shape for o in outs} == {(64, 64, 3)}  # the whole image, shifted: no 32 px crop of a 64 px one
    assert max(int((o == 0).all(2).any(1).sum()) for o in outs) > 2  # shifted in by up to 6 px of black
    resized = build_train_transform(
        [{"RandomResizedCrop": {"size": [48, 48], "scale": [0.5, 1.0]}}], seed=0, cache_size=64, image_size=48
    )  # from the cache to the network's size
    assert resized(image=image)["image"].shape == (48, 48, 3)
    with pytest.raises(
        PipelineError,
        match=r"train.augment: turns the 64 px cache images into 32x32; .* crop to "
        r"48 or 64 px",
    ):
        build_train_transform(
            [{"PadIfNeeded": {"min_height": 38, "min_width": 38}}, {"RandomCrop": {"height": 32, "width": 32}}],
            seed=0,
            cache_size=64,
            image_size=48,
        )


def test_a_fold_reads_the_memory_mapped_cache_without_copying_it(prepared):
    rows = np.flatnonzero(prepared.train["fold"].to_numpy() == 1)
    fold = Rows(prepared.train_images, rows)
    assert isinstance(prepared.train_images, np.memmap) and len(fold) == len(rows)
    assert isinstance(fold[1:3], Rows)  # slicing stays lazy; reading a batch reads those rows
    np.testing.assert_array_equal(np.asarray(fold[1:3]), prepared.train_images[rows[1:3]])
    np.testing.assert_array_equal(fold[4], prepared.train_images[rows[4]])


def test_dropout_rate_reaches_the_model_and_drops_in_training_only():
    """train.drop_rate is applied: in train mode the same input gives other logits each call (units
    dropped), in eval mode the same ones; with drop_rate 0 train mode is deterministic too."""
    x = torch.randn(4, 3, 16, 16)
    torch.manual_seed(0)
    dropped = create_model("test_resnet", 3, drop_rate=0.5).train()
    assert not torch.equal(dropped(x), dropped(x))
    dropped.eval()
    assert torch.equal(dropped(x), dropped(x))
    torch.manual_seed(0)
    plain = create_model("test_resnet", 3, drop_rate=0.0).train()
    assert torch.equal(plain(x), plain(x))  # batch norm in train mode: deterministic for a fixed batch


def test_drop_path_rate_reaches_the_model():
    model = create_model("test_efficientnet", 3, drop_path_rate=0.2)
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) > 0


def test_unknown_backbone_is_named():
    with pytest.raises(PipelineError, match="unknown timm model 'resnet_nope'"):
        create_model("resnet_nope", num_classes=3)


def test_local_pretrained_weights_are_loaded_with_a_new_head(tmp_path):
    torch.manual_seed(1)
    source = create_model("test_resnet", num_classes=7)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    model = create_model("test_resnet", num_classes=3, pretrained=path)
    assert model.fc.out_features == 3
    loaded, saved, fresh = (
        m.state_dict()["layer1.0.conv1.weight"] for m in (model, source, create_model("test_resnet", num_classes=3))
    )
    torch.testing.assert_close(loaded, saved)
    assert not torch.equal(fresh, saved)


def test_missing_pretrained_file_is_named(tmp_path):
    with pytest.raises(PipelineError, match="weights file '.*absent.pth' not found"):
        create_model("test_resnet", num_classes=3, pretrained=tmp_path / "absent.pth")


class _OutOfMemoryAbove(torch.nn.Module):
    """A real model that raises CUDA's out-of-memory error for batches above `limit`, as a GPU would."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.net = create_model("test_vit", 3)

    def forward(self, x):
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.net(x)


def test_out_of_memory_in_training_suggests_a_smaller_batch(prepared):
    data = _fold0(prepared)
    model = _OutOfMemoryAbove(limit=2)
    with pytest.raises(
        PipelineError,
        match=r"out of GPU memory at train.batch_size=4; lower it \(e.g. to 2\) "
        r"and raise train.grad_accum_steps",
    ):
        _fit(model, *data, SETTINGS, 16, CPU, 3)


def test_inference_halves_the_batch_until_it_fits(prepared):
    torch.manual_seed(0)
    model = _OutOfMemoryAbove(limit=3)
    images = np.asarray(prepared.train_images[:10])
    got = predict(model, images, InputConfig(16, (0.5,) * 3, (0.25,) * 3), batch_size=16, device=CPU, task=TASK3)
    expected = predict(
        model.net, images, InputConfig(16, (0.5,) * 3, (0.25,) * 3), batch_size=1, device=CPU, task=TASK3
    )
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_compile_runs_the_loop_through_torch_compile(prepared):
    import torch._dynamo

    data = _fold0(prepared)
    s = dataclasses.replace(SETTINGS, epochs=1, augment=[], compile="eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    compiled = _fit(create_model("test_vit", 3), *data, s, 16, CPU, 3)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    torch.manual_seed(0)
    eager = _fit(create_model("test_vit", 3), *data, dataclasses.replace(s, compile=None), 16, CPU, 3)
    np.testing.assert_allclose(compiled.val_probs, eager.val_probs, atol=1e-5)


def test_bootstrap_rows_resample_with_replacement_reproducibly():
    rows = np.arange(100, 200)
    a = bootstrap_rows(rows, seed=1, fold=0)
    assert len(a) == 100 and set(a) <= set(rows)
    assert len(set(a)) < 80  # with replacement: about 63% distinct
    assert np.array_equal(a, bootstrap_rows(rows, 1, 0))
    assert not np.array_equal(a, bootstrap_rows(rows, 2, 0)) and not np.array_equal(a, bootstrap_rows(rows, 1, 1))


def test_seed_bag_trains_every_fold_per_seed_and_averages_the_oof(prepared, tmp_path):
    s = dataclasses.replace(SETTINGS, epochs=1, seeds=[3, 4])
    bag, metrics = _bag(prepared, "b", "test_resnet", s, 16, tmp_path / "models", CPU, OFF)
    per_seed = []
    folds = prepared.train["fold"].to_numpy()
    for seed in (3, 4):
        oof = np.zeros_like(bag)
        for k in range(2):
            model, ckpt = load_fold_model(tmp_path / "models" / f"seed{seed}" / f"fold{k}" / "model.pt", CPU)
            assert ckpt["seed"] == seed
            oof[folds == k] = predict(
                model, prepared.train_images[folds == k], InputConfig.from_checkpoint(ckpt), 8, CPU, task=TASK3
            )
        per_seed.append(oof)
    np.testing.assert_allclose(bag, np.mean(per_seed, 0), atol=1e-5)
    assert not np.allclose(per_seed[0], per_seed[1])  # different seeds, different models
    targets = prepared.train["target"].to_numpy()
    assert set(metrics["seeds"]) == {"3", "4"}
    assert metrics["seeds"]["3"]["log_loss"] == pytest.approx(log_loss(per_seed[0], targets), abs=1e-5)
    assert metrics["oof"]["log_loss"] == pytest.approx(log_loss(bag, targets), abs=1e-5)
    boot, _ = _bag(
        prepared, "b", "test_resnet", dataclasses.replace(s, seeds=[3], bootstrap=True), 16, tmp_path / "boot", CPU, OFF
    )
    assert not np.allclose(boot, per_seed[0], atol=1e-4)  # same seed, resampled rows: another model


def test_no_two_seed_fold_pairs_of_a_bag_share_an_initialisation():
    pairs = [(seed, fold) for seed in (42, 43, 44) for fold in range(5)]  # 43 = 42 + 1 = 43 + 0 under seed + fold
    fold_seeds = [derive_seed(seed, fold) for seed, fold in pairs]
    assert len(set(fold_seeds)) == len(pairs)
    weights = [initial_model("test_resnet", 3, SETTINGS, fold_seed).fc.weight for fold_seed in fold_seeds]
    assert not [
        (a, b)
        for i, a in enumerate(pairs)
        for j, b in enumerate(pairs)
        if i < j and torch.equal(weights[i], weights[j])
    ]
    epoch_seeds = {derive_seed(s, epoch) for s in fold_seeds for epoch in range(10)}
    assert len(epoch_seeds) == 10 * len(pairs)  # nor the augmentation and batch order of any epoch


def test_registered_cifar_net_is_a_timm_model_that_trains_and_freezes(prepared):
    import timm

    assert timm.is_model("cifar_net_s")
    model = create_model("cifar_net_s", num_classes=3, drop_rate=0.1)
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 3)
    assert create_model("cifar_net_s", num_classes=0)(torch.zeros(2, 3, 16, 16)).shape == (2, 128)
    frozen = freeze(model, 0)  # the stem only
    assert frozen and all(n.startswith("stem") for n in frozen)
    torch.manual_seed(0)
    net = create_model("cifar_net_s", 3)
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    stems = []
    result = _fit(
        net,
        *_fold0(prepared),
        dataclasses.replace(SETTINGS, epochs=3),
        16,
        CPU,
        3,
        on_epoch=lambda epoch, row: stems.append(net.stem[0].weight.detach().clone()),
    )
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    moved = {n for n in trainable if not torch.equal(result.state_dict[n], initial[n])}
    assert moved == trainable  # every trainable tensor trained; the stem's whitening weight is frozen (below)
    # the stem was initialised as the whitening transform of the fold's training patches, then kept fixed
    tr_images, _, _, _, mean, std = _fold0(prepared)
    model = create_model("cifar_net_s", 3)
    fresh_stem = model.stem[0].weight.clone()
    model.load_state_dict(result.state_dict)
    stem = model.stem[0]
    assert not torch.allclose(stem.weight, fresh_stem)
    x = to_input(torch.from_numpy(tr_images), InputConfig(16, tuple(mean), tuple(std)), CPU)
    patches = x.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
    out = (patches - patches.mean(0)) @ stem.weight.reshape(24, 12).T
    cov = torch.cov(out[:, :12].T)
    eigval = torch.linalg.eigvalsh(torch.cov(patches.T)).flip(0)
    # each eigen-direction comes out with variance eigval / (eigval + eps): ~1 unless nearly constant...
    torch.testing.assert_close(torch.diagonal(cov), eigval / (eigval + 5e-4), atol=0.02, rtol=0)
    assert (torch.diagonal(cov) > 0.9).sum() >= 6
    assert (cov - torch.diag(torch.diagonal(cov))).abs().max() < 0.02  # ...and uncorrelated with the others
    torch.testing.assert_close(stem.weight[12:], -stem.weight[:12])
    assert len(stems) == 3 and all(torch.equal(w, stems[0]) for w in stems)  # not trained
    torch.testing.assert_close(stems[0], stem.weight.contiguous())


def test_val_every_skips_validation_and_keeps_the_last_epoch_when_it_equals_epochs(prepared, tmp_path):
    data = _fold0(prepared)
    s = dataclasses.replace(SETTINGS, epochs=3, val_every=3)
    torch.manual_seed(0)
    result = _fit(create_model("test_resnet", 3), *data, s, 16, CPU, 3)
    assert ["val_accuracy" in row for row in result.history] == [False, False, True]
    assert result.best_epoch == 2
    model = create_model("test_resnet", 3)
    model.load_state_dict(result.state_dict)
    np.testing.assert_allclose(
        predict(model, data[2], InputConfig(16, tuple(data[4]), tuple(data[5])), 8, CPU, TASK3),
        result.val_probs,
        atol=1e-6,
    )

    # killed after an unvalidated epoch, it resumes to the same weights
    class Killed(Exception):
        pass

    def kill(epoch, row):
        if epoch == 0:
            raise Killed

    torch.manual_seed(0)
    with pytest.raises(Killed):
        _fit(create_model("test_resnet", 3), *data, s, 16, CPU, 3, on_epoch=kill, state_path=tmp_path / "state.pt")
    resumed = _fit(create_model("test_resnet", 3), *data, s, 16, CPU, 3, state_path=tmp_path / "state.pt")
    np.testing.assert_array_equal(resumed.val_probs, result.val_probs)
    with pytest.raises(PipelineError, match="train.val_every"):
        from pipeline.config import check_train_settings

        check_train_settings(dataclasses.replace(s, val_every=0), "train")


class _PriorOnly(torch.nn.Module):
    """A model that can learn nothing but the class prior: its logits are one learnable bias."""

    def __init__(self, n_classes: int):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(n_classes))

    def forward(self, x):
        return self.bias.expand(len(x), -1) + 0 * x.mean()


@pytest.mark.parametrize(
    "settings, rare_low, rare_high",
    [
        ({}, 0.0, 0.15),  # the prior: 10 of 110 rows, 0.09
        ({"class_weight": "balanced"}, 0.4, 0.6),  # both classes weigh the same: 0.5
        ({"class_weight": "balanced", "mixup_alpha": 0.2}, 0.4, 0.6),
        ({"sampler": "balanced"}, 0.4, 0.6),  # both classes drawn as often: 0.5
    ],
)
def test_class_weight_and_balanced_sampler_undo_a_10_to_1_imbalance(settings, rare_low, rare_high):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (150, 8, 8, 3), dtype=np.uint8)
    y_train, y_val = np.array([0] * 100 + [1] * 10), np.array([0] * 30 + [1] * 10)
    s = TrainSettings(
        epochs=10,
        batch_size=10,
        lr=0.05,
        weight_decay=0.0,
        warmup_epochs=0.5,
        scheduler="constant",
        augment=[],
        seed=0,
        val_every=10,
        **settings,
    )
    result = _fit(_PriorOnly(2), images[:110], y_train, images[110:], y_val, [0.5] * 3, [0.25] * 3, s, 8, CPU, 2)
    assert rare_low < result.val_probs[:, 1].mean() < rare_high


# ---------------------------------------------------------------- pretrained weights and their normalisation


def _offline_error(tmp_path, name: str) -> str:
    """What `create_model(name, 3, pretrained=True)` prints as `ERROR <message>` offline with an empty hub cache."""
    code = (
        "from pipeline.models import create_model\n"
        "from pipeline.errors import PipelineError\n"
        f"try:\n    create_model({name!r}, 3, pretrained=True)\n"
        "except PipelineError as e:\n    print('ERROR', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-cache")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    return out.stdout


def test_pretrained_true_offline_without_a_cache_is_one_line_naming_the_alternatives(tmp_path):
    line = _offline_error(tmp_path, "resnet10t").strip()
    assert line.startswith("ERROR resnet10t: pretrained weights are neither in the Hugging Face cache nor downloadable")
    assert "local timm/.safetensors file" in line and "model.pt" in line and "\n" not in line


def _finished_run(prepared, tmp_path) -> Path:
    """A finished train stage's outputs for backbone `b` (test_resnet, 2 folds x 1 epoch) in tmp_path."""
    _, metrics = _bag(
        prepared, "b", "test_resnet", dataclasses.replace(SETTINGS, epochs=1), 16, tmp_path / "models/b", CPU, OFF
    )
    (tmp_path / "reports/train").mkdir(parents=True)
    (tmp_path / "reports/train/b.json").write_text(json.dumps(metrics))
    (tmp_path / "params.yaml").write_text("train:\n  seed: 0\n  backbones: {b: {model: test_resnet}}\n")
    return tmp_path


def test_a_finished_runs_model_and_its_export_transfer_with_a_new_head(prepared, tmp_path, monkeypatch):
    run = _finished_run(prepared, tmp_path)
    monkeypatch.chdir(run)
    (run / "data/prepared").mkdir(parents=True)
    (run / "data/prepared/classes.json").write_text(json.dumps({"classes": prepared.classes}))
    assert cli.main(["export", "--backbone", "b"]) == 0
    info = json.loads((run / "exports/b/export.json").read_text())
    folds = json.loads((run / "reports/train/b.json").read_text())["folds"]
    best = max(folds, key=lambda k: folds[k]["accuracy"])
    assert info["from"] == f"models/b/seed0/fold{best}/model.pt"
    fold = torch.load(run / info["from"], weights_only=True)
    source = fold["state_dict"]
    assert sorted(p.name for p in (run / "exports/b").iterdir()) == ["config.json", "export.json", "model.safetensors"]
    for pretrained in (run / "models/b/seed0/fold0/model.pt", "exports/b", "local-dir:exports/b"):
        model = create_model("test_resnet", 5, pretrained=pretrained)
        assert model.fc.out_features == 5  # a new competition's head
    torch.testing.assert_close(model.state_dict()["layer1.0.conv1.weight"], source["layer1.0.conv1.weight"])
    # the fold's own data config travels with it, as timm reads it
    assert pretrained_config("test_resnet", "exports/b") == {
        "mean": pytest.approx(fold["mean"]),
        "std": pytest.approx(fold["std"]),
        "image_size": 16,
        "interpolation": "bilinear",
    }
    # plain timm loads the export as a model of its own, the whole fold model, head and all
    direct = timm.create_model("local-dir:exports/b", pretrained=True)
    torch.testing.assert_close(direct.state_dict(), {k: v for k, v in source.items()})
    assert timm.data.resolve_model_data_config(direct)["mean"] == pytest.approx(fold["mean"])
    assert direct.pretrained_cfg["label_names"] == prepared.classes
    # ... and the pipeline takes it as a model name: architecture and weights from the folder, a new head
    named = create_model("local-dir:exports/b", 5, pretrained=True)
    assert named.fc.out_features == 5
    torch.testing.assert_close(named.state_dict()["layer1.0.conv1.weight"], source["layer1.0.conv1.weight"])
    with pytest.raises(PipelineError, match="holds a test_resnet, not a test_efficientnet"):
        create_model("test_efficientnet", 5, pretrained=run / "models/b/seed0/fold0/model.pt")
    with pytest.raises(PipelineError, match="exports/b' holds a test_resnet, not a test_efficientnet"):
        create_model("test_efficientnet", 5, pretrained="exports/b")


def test_a_timm_folder_with_as_many_classes_as_the_competition_still_gets_a_new_head(tmp_path):
    """timm keeps a checkpoint's classifier when the class counts match (ImageNet's 1,000 classes on a
    1,000-class competition); the pipeline always starts the competition's head afresh."""
    torch.manual_seed(0)
    source = create_model("test_resnet", 7)
    timm.models.save_for_hf(source, str(tmp_path / "w"), safe_serialization=True)
    assert timm.create_model(f"local-dir:{tmp_path / 'w'}", pretrained=True).fc.weight.equal(source.fc.weight)
    for model in (
        create_model(f"local-dir:{tmp_path / 'w'}", 7, pretrained=True),
        create_model("test_resnet", 7, pretrained=f"local-dir:{tmp_path / 'w'}"),
    ):
        assert model.fc.out_features == 7 and not model.fc.weight.equal(source.fc.weight)
        torch.testing.assert_close(model.conv1[0].weight, source.conv1[0].weight)


def test_timm_source_names_are_accepted_and_their_errors_are_one_line(tmp_path):
    check_backbone("hf-hub:timm/resnet10t.c3_in1k")  # resolved through the hub when the model is created
    with pytest.raises(PipelineError, match=r"^k: '.*nowhere' has no config.json"):
        check_backbone(f"local-dir:{tmp_path / 'nowhere'}", "k")
    out = _offline_error(tmp_path, "hf-hub:timm/resnet10t.c3_in1k")
    assert out.startswith("ERROR hf-hub:timm/resnet10t.c3_in1k: pretrained weights are neither in the"), out
    assert out.count("\n") == 1


def test_a_pretrained_model_is_fed_its_weights_own_normalisation(prepared, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "model.pt"  # a source run whose inputs were normalised with these statistics
    torch.save(
        {
            "model": "test_resnet",
            "num_classes": 7,
            "state_dict": create_model("test_resnet", 7).state_dict(),
            "mean": [0.1, 0.2, 0.3],
            "std": [0.4, 0.5, 0.6],
            "image_size": 16,
        },
        weights,
    )
    timm_file = tmp_path / "timm.pth"  # a plain timm checkpoint: timm's data config of the architecture
    torch.save(create_model("test_resnet", 7).state_dict(), timm_file)
    s = dataclasses.replace(SETTINGS, epochs=1)
    fold_mean, fold_std = prepared.fold_stats(0)
    timm_cfg = timm.models.get_pretrained_cfg("test_resnet")  # what timm says the architecture's weights expect
    cases = [
        (None, s, fold_mean, fold_std),
        (weights, s, [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]),
        (timm_file, s, list(timm_cfg.mean), list(timm_cfg.std)),
        (weights, dataclasses.replace(s, mean=[0.5] * 3, std=[0.2] * 3), [0.5] * 3, [0.2] * 3),
    ]  # params win
    for pretrained, settings, mean, std in cases:
        _, ckpt = train_fold(prepared, 0, _backbone("test_resnet", settings, 16, pretrained), CPU)
        assert ckpt["mean"] == pytest.approx(mean) and ckpt["std"] == pytest.approx(std), pretrained
    assert fold_mean != pytest.approx(list(timm_cfg.mean))  # the cases differ


def test_a_tag_picks_its_weights_data_config_without_downloading():
    assert pretrained_config("convnext_tiny.fb_in22k_ft_in1k_384", True)["image_size"] == 384
    assert pretrained_config("convnext_tiny.fb_in22k", True)["image_size"] == 224
    assert pretrained_config("resnet10t", None) is None and pretrained_config("cifar_net_s", True) is None
    s = dataclasses.replace(SETTINGS, image_size=None)
    tagged = pretrained_config("convnext_tiny.fb_in22k_ft_in1k_384", True)
    assert input_size(s, tagged, 32) == 384  # the weights' input size
    assert input_size(s, pretrained_config("convnext_tiny.fb_in22k_ft_in1k_384", None), 32) == 32  # random: the cache's
    assert input_size(dataclasses.replace(s, image_size=64), tagged, 32) == 64  # params win


# ---------------------------------------------------------------- precision


def test_auto_precision_follows_the_probe_and_fp16_needs_cuda():
    fast_bf16 = lambda: {"fp32_images_per_s": 100.0, "bf16_images_per_s": 180.0}  # noqa: E731
    slow_bf16 = lambda: {"fp32_images_per_s": 100.0, "bf16_images_per_s": 103.0}  # noqa: E731 - within noise
    assert resolve_precision("auto", CPU, fast_bf16) == ("bf16", fast_bf16())
    assert resolve_precision("auto", CPU, slow_bf16) == ("fp32", slow_bf16())
    assert resolve_precision(None, CPU, fast_bf16) == ("fp32", None)  # null: today's behaviour, no probe
    assert resolve_precision("bf16", CPU, fast_bf16) == ("bf16", None)
    with pytest.raises(PipelineError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", CPU, fast_bf16)


def test_auto_precision_skips_timing_bf16_without_a_native_path_and_trains_fp32(monkeypatch):
    """On a CPU whose oneDNN has no bf16 kernels (AVX2 alone) the probe times nothing: fp32, at no cost."""
    monkeypatch.setattr(precision_module, "has_native_bf16", lambda device: False)

    class Untimed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            raise AssertionError("the probe ran the model")

    figures = precision_module.probe_precision(Untimed(), 8, 16, CPU)  # a native path would train it: 24 steps
    assert figures["bf16_images_per_s"] is None and "no native bf16" in figures["bf16"]
    assert resolve_precision("auto", CPU, lambda: figures) == ("fp32", figures)
    monkeypatch.undo()
    if precision_module.has_native_bf16(CPU):  # with one, the same model is run (and fails)
        with pytest.raises(AssertionError, match="the probe ran the model"):
            precision_module.probe_precision(Untimed(), 8, 16, CPU)


def test_bf16_training_runs_end_to_end_on_the_cpu_and_keeps_fp32_weights(prepared, tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        s = dataclasses.replace(SETTINGS, epochs=2, precision=precision)
        oof, metrics = _bag(prepared, "b", "test_efficientnet", s, 16, tmp_path / precision, CPU, OFF)
        ckpt = torch.load(tmp_path / precision / "seed0/fold0/model.pt", weights_only=True)
        assert ckpt["precision"] == metrics["precision"] == precision
        assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values() if v.is_floating_point())
        np.testing.assert_allclose(oof.sum(1), 1.0, atol=1e-5)
        test = (
            predict_backbone(prepared, tmp_path / precision, {"none": ["identity"]}, "mean", 8, CPU)
            .policies["none"]
            .test
        )
        assert test.shape == (len(prepared.test), 3)
        runs[precision] = oof
    assert np.abs(runs["bf16"] - runs["fp32"]).max() > 1e-4  # autocast was on: bf16 rounding moved the outputs


class _SlowDataset(torch.utils.data.Dataset):
    """4 ms per image: at most 250 images/s in one worker."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        time.sleep(0.004)
        return torch.zeros(3), 0


def test_num_workers_null_feeds_a_gpu_from_the_measured_data_path(monkeypatch):
    assert default_num_workers(torch.device("cpu"), _SlowDataset(), 8) == 0  # the CPU computes on every core
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    workers = default_num_workers(torch.device("cuda"), _SlowDataset(), 8)
    assert GPU_IMAGES_PER_S / 250 <= workers <= 63  # 3,000 images/s need 12+ workers at <= 250 each
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert default_num_workers(torch.device("cuda"), _SlowDataset(), 8) == 3  # a core stays for the main process


def test_a_pretrained_model_is_resized_with_its_weights_interpolation(prepared, tmp_path):
    from timm.models import save_for_hf

    folder = tmp_path / "weights"  # a timm folder whose weights were trained on bicubic-resized inputs
    data_cfg = {"mean": (0.5,) * 3, "std": (0.5,) * 3, "input_size": (3, 16, 16), "interpolation": "bicubic"}
    save_for_hf(
        create_model("test_resnet", 7), str(folder), model_config={"pretrained_cfg": data_cfg}, safe_serialization=True
    )
    s = dataclasses.replace(SETTINGS, finetune="features+sklearn")  # one fit, no epochs: only the config matters
    area = dataclasses.replace(s, interpolation="area")
    cases = [(folder, s, "bicubic"), (None, s, "bilinear"), (folder, area, "area")]
    for pretrained, settings, expected in cases:  # the weights' own, else bilinear; params win
        _, ckpt = train_fold(prepared, 0, _backbone("test_resnet", settings, 12, pretrained), CPU)
        assert ckpt["interpolation"] == expected, pretrained
    x = torch.rand(2, 3, 16, 16)
    resized = {m: resize_batch(x, 12, m) for m in ("bilinear", "bicubic", "area")}  # each resizes differently
    assert (resized["bicubic"] - resized["bilinear"]).abs().max() > 1e-3
    assert (resized["area"] - resized["bilinear"]).abs().max() > 1e-3


@pytest.mark.not_isa  # an initialisation, not a float trajectory
def test_dirac_init_starts_every_3x3_conv_as_the_identity_on_its_first_channels():
    def convs(model):
        return [
            m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
        ]

    plain = convs(initial_model("cifar_net_s", 10, TrainSettings(), 0))
    dirac = convs(initial_model("cifar_net_s", 10, TrainSettings(dirac_init=True), 0))
    assert len(dirac) == 6
    for w, w0 in zip(dirac, plain):
        n = min(w.shape[0], w.shape[1])
        identity = torch.zeros(n, w.shape[1], 3, 3)
        identity[range(n), range(n), 1, 1] = 1
        torch.testing.assert_close(w[:n], identity)
        torch.testing.assert_close(w[n:], w0[n:])  # the other channels keep their random draw
        assert (w0[:n] - identity).abs().max() > 0.05
