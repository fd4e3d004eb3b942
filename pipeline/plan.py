"""The `plan` stage: fit a whole `dvc repro` into `budget.minutes`.

Before any training, each backbone's training and prediction speed is measured on this machine
with its own settings (precision, batch, augmentation, input size): a few batches of fold 0's
training rows through the real training loop (`train.train_fold`), and inference batches as the predict
stage runs them. From those speeds and the competition's size, `plan_epochs` chooses the epochs of
every backbone so that the stages still to come (train, predict with every TTA view, refit, ensemble,
analyze), added to the seconds prepare (and tune) took, end inside the budget; the LR schedule
follows the planned epochs because training reads them. With `budget.minutes: null` the plan is
the epochs of params.yaml and nothing is measured.

Writes plan/<backbone>.json (read by its train stage: `backbone.planned`) and reports/plan.json
(speeds measured, planned seconds per stage). The `timing` stage later sets the actual seconds beside
the planned ones in reports/timing.json.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.backbone import Backbone
from pipeline.config import Params, TrainSettings, TTAConfig
from pipeline.data import InputConfig, PreparedData, Rows
from pipeline.errors import PipelineError
from pipeline.fold import initial_model, train_fold
from pipeline.inference import fold_model, predict_outputs
from pipeline.io import atomic_dir, seconds_so_far, write_json
from pipeline.metrics import is_better_scores
from pipeline.precision import cached_probe, resolve_precision

# Seconds the planner cannot measure before they happen, from runs on 2 CPU cores (docs/guide.md, "Time budget"):
STAGE_OVERHEAD_S = 6.0  # a stage process's start: imports of torch, timm, pandas; reading params and the cache
IDLE_STAGE_S = 1.0  # a stage with nothing to do (refit off): Python and params, no torch
DVC_GAP_S = 2.0  # DVC between two stages: hashing the outputs, writing dvc.lock
FOLD_SETUP_S = 1.0  # per fold: a fresh model, its data-dependent init, saving its checkpoint
ENSEMBLE_S_PER_ROW = 1e-4  # per OOF row and backbone (cross-fitted methods over the folds)
ANALYZE_S_PER_ROW = 3e-4  # per OOF row (image properties, galleries, figures)
EPOCH_STEP = 0.01  # planned epochs are fractional, in hundredths: no whole-epoch rounding leaves time idle
MARGIN = 0.10  # the plan fills 90% of the budget: a 2-core machine's speed drifted by up to 10% between
# the probe and the run (cifar_net_l: 1,002 images/s probed, 912 trained, minutes later)
# the speed probe (docs/probe.md): a warm-up pass of a few batches, then a timed pass of budget.probe_batches at
# most, fewer where that would cost more than PROBE_BUDGET_SHARE of the budget, never fewer than PROBE_MIN_BATCHES
PROBE_WARMUP_BATCHES = 10
PROBE_BUDGET_SHARE = 0.02
# TTA under a budget (`plan_tta`): where a model falls short of its params epochs, the plan drops TTA (backbones with
# tta.select: auto) if that buys every model this many times the epochs. Below 12 epochs each doubling gave
# cifar_net_l +3.2 points (6 -> 12 epochs on fold 0), so 1.25x buys about 1 point, what TTA gained at 11-12 epochs
# (+1.0 on fold 0, docs/airbench.md); at 1.09 epochs TTA gained 0.12 and its views took 37% of a 20-minute run
TTA_EPOCHS_GAIN = 1.25
PROBE_MIN_BATCHES = 20  # 20 batches came within 10% of an epoch's speed; 40 took 119 s of 20 minutes on AVX2 alone
# train.finetune: auto, from three measured points with ImageNet weights on 2 cores (docs/finetune.md): frozen
# features into a logistic regression beat full fine-tuning by 9-24 points at ~75 updates per fold model (10-250
# photos per class, Lite0 at 96 px, docs/transfer.md); full won by 4.2 points at 176 updates and 99 training
# photos per class (Sign Language Digits) and by 5.7 at ~625 updates and 667 per class (photo-cpu). The
# thresholds sit under the points full won: between 75 and 176 updates nothing is measured.
UPDATES_FOR_FULL = 120  # optimizer steps per fold model
ROWS_PER_CLASS_FOR_FULL = 50  # training rows of a fold model's median class (a score or grade: all its rows)
# ...and where the budget allows, the two measured instead (`compare_regimes`): fold 0's training rows in this
# many parts, one to validate on
COMPARE_PARTS = 5
# train.image_size: auto: these shares of the largest side (the cache's or the images' median native side, the
# smaller), in multiples of SIDE_MULTIPLE, none under MIN_SIDE (or the largest side where that is smaller)
SIDE_SHARES = (1.0, 0.75, 0.5)
SIDE_MULTIPLE = 8
MIN_SIDE = 16
# a side counts as giving every model its params epochs from this share of them: the plan's epochs are estimates
# (the sides between the probed two interpolated), and on Sign Language Digits at 5 minutes 72 px's estimate, 7.47
# epochs of 8, fell 13% under its own probe's 8.56, which sent a hard threshold to 48 px, 6.7 OOF points under
# 72 px (docs/image_size.md)
SIDE_EPOCHS_SHARE = 0.85


@dataclasses.dataclass(frozen=True)
class BackboneWork:
    """What one backbone's train and predict stages do, in images: the planner's input besides speed."""

    epochs: int  # params.yaml's (tuned) epochs: the planner keeps the backbones' ratios
    val_every: int
    fits: int  # models trained: folds x seeds
    train_rows: float  # per model and epoch (a fold's training part, averaged over folds)
    val_rows: float  # per model and validation (a fold's validation part)
    val_models: int  # weights validated each time (2 with an EMA)
    predict_images: float  # predict stage: (OOF rows + folds x test rows) x seeds x TTA views
    trains: bool = True  # False for features+sklearn: one fit, no epochs to plan
    refit_fits: int = 0  # refit stage: models trained on all rows (refit.seeds; 0: refit off)
    refit_rows: float = 0.0  # per refit model and epoch: every training row
    refit_predict_images: float = 0.0  # (test + holdout rows) x refit models x the chosen policy's views
    folds: int | None = None  # the folds trained (cv.train_folds); None: not recorded in the plan


@dataclasses.dataclass(frozen=True)
class Speed:
    train: float  # training images/s (augmentation, forward, backward, step)
    infer: float  # inference images/s per view


def speeds_by_side(measured: dict[int, Speed], sides: list[int]) -> dict[int, Speed]:
    """Speeds at every one of `sides` from those `measured` at two of them (or one): seconds per image taken
    as a + b x side^2 (a per-image cost, such as augmenting and batching, and one per pixel), fitted through
    the two points, for training and inference alike; with one point, per pixel alone."""
    (s1, v1), *rest = sorted(measured.items())
    s2, v2 = rest[-1] if rest else (s1, v1)

    def rate(f1: float, f2: float, side: int) -> float:
        t1, t2 = 1 / f1, 1 / f2
        if s2 == s1:
            return f1 * (s1 / side) ** 2
        b = max(0.0, (t2 - t1) / (s2**2 - s1**2))
        a = max(0.0, t1 - b * s1**2)
        t = a + b * side**2
        return 1 / t if t > 0 else float("inf")  # too few images to time (a probe of a tiny set)

    return {side: Speed(rate(v1.train, v2.train, side), rate(v1.infer, v2.infer, side)) for side in sides}


def planned_val_every(work: BackboneWork, epochs: float) -> int:
    """val_every >= params' epochs means "keep the last epoch" and keeps meaning it at any planned epochs."""
    return math.ceil(epochs) if work.val_every >= work.epochs else work.val_every


def train_seconds(work: BackboneWork, speed: Speed, epochs: float) -> float:
    """A train stage's seconds for `epochs`: every fold model's epochs, its validations, its setup."""
    if not work.trains:
        return STAGE_OVERHEAD_S + work.fits * (FOLD_SETUP_S + (work.train_rows + work.val_rows) / speed.infer)
    validations = math.ceil(epochs / planned_val_every(work, epochs))  # every val_every-th epoch and the last
    per_model = epochs * work.train_rows / speed.train + validations * work.val_models * work.val_rows / speed.infer
    return STAGE_OVERHEAD_S + work.fits * (FOLD_SETUP_S + per_model)


def predict_seconds(work: BackboneWork, speed: Speed) -> float:
    return STAGE_OVERHEAD_S + work.predict_images / speed.infer


def refit_seconds(work: BackboneWork, speed: Speed, epochs: float) -> float:
    """A refit stage's seconds with the folds trained for `epochs`: its models at most as many epochs (the
    mean of those the folds kept) over every row, then its test and holdout predictions; off, its start."""
    per_model = (epochs if work.trains else 1) * work.refit_rows / (speed.train if work.trains else speed.infer)
    return STAGE_OVERHEAD_S + work.refit_fits * (FOLD_SETUP_S + per_model) + work.refit_predict_images / speed.infer


def training_seconds(work: BackboneWork, speed: Speed, epochs: float) -> float:
    """What a backbone's epochs cost: its train stage and, when it refits, its refit stage (off, the refit
    stage's start is a fixed cost)."""
    return train_seconds(work, speed, epochs) + (refit_seconds(work, speed, epochs) if work.refit_fits else 0.0)


def plan_epochs(
    budget_s: float, fixed_s: dict[str, float], work: dict[str, BackboneWork], speeds: dict[str, Speed]
) -> dict[str, float]:
    """Epochs per backbone: the most that fit (1 - MARGIN) of `budget_s` after the `fixed_s` stages
    (prepare, tune, predict, ensemble, analyze, DVC's gaps), every backbone's params epochs scaled by
    one factor so that their ratios stay: fractional, rounded down to EPOCH_STEP (the loop trains that
    share of a last epoch's batches), at least 1. Raises PipelineError naming the smallest budget when one
    epoch per fold model does not fit."""
    fixed = sum(fixed_s.values())
    available = budget_s * (1 - MARGIN) - fixed

    def at(factor: float) -> dict[str, float]:
        steps = lambda w: math.floor(factor * w.epochs / EPOCH_STEP + 1e-9) * EPOCH_STEP  # noqa: E731
        return {b: max(1.0, round(steps(w), 6)) if w.trains else w.epochs for b, w in work.items()}

    def cost(epochs: dict[str, int]) -> float:
        return sum(training_seconds(w, speeds[b], epochs[b]) for b, w in work.items())

    minimum = cost(at(0.0))
    if minimum > available:
        raise PipelineError(
            f"budget.minutes: {budget_s / 60:g} is too small for one epoch per fold model; this run needs at "
            f"least {math.ceil((fixed + minimum) / (1 - MARGIN) / 6) / 10:g} minutes "
            f"(training {minimum / 60:.1f}, the other "
            f"stages {fixed / 60:.1f})"
        )
    lo, hi = 0.0, 1.0
    while cost(at(hi)) <= available and hi < 1e6:  # cost only grows with the factor
        lo, hi = hi, hi * 2
    for _ in range(60):  # bisect to the largest factor that fits
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(at(mid)) <= available else (lo, mid)
    return at(lo)


# ---------------------------------------------------------------- measuring this machine


def probe_batches(budget_s: float | None, warm_speed: float, batch_size: int, most: int) -> int:
    """The timed probe pass's batches: PROBE_BUDGET_SHARE of `budget_s` at the warm-up pass's speed (`warm_speed`
    images/s), between PROBE_MIN_BATCHES and `most` (budget.probe_batches); `most` without a budget."""
    if budget_s is None:
        return most
    scaled = math.floor(PROBE_BUDGET_SHARE * budget_s * warm_speed / batch_size)
    return max(min(most, PROBE_MIN_BATCHES), min(most, scaled))


def _probe_pass(data: PreparedData, backbone: Backbone, device: torch.device, batches: int) -> tuple:
    """(training images/s, checkpoint, FoldResult, images timed) of one epoch of a fresh model over `batches`
    batches of fold 0's training rows (drawn at random from all of them, seeded; all where they are fewer) and one
    validation batch, through `train_fold`."""
    s = backbone.settings
    tr, va = np.flatnonzero(data.folds != 0), np.flatnonzero(data.folds == 0)
    if len(tr) > batches * s.batch_size:  # the probe's epoch: `batches` batches, as a sampler limited to them
        tr = np.sort(np.random.default_rng(s.seed).choice(tr, batches * s.batch_size, replace=False))
    rows = np.concatenate([tr, va[: min(len(va), s.batch_size)]])  # validation: one batch, not the fold's
    sub = data.rows(rows)
    sub.train["fold"] = [1] * len(tr) + [0] * (len(rows) - len(tr))
    probe = dataclasses.replace(
        s,
        epochs=1,
        val_every=1,
        seeds=None,
        bootstrap=False,
        early_stopping_patience=None,
        mixup_off_epoch=None,
        unfreeze_epoch=None,
    )
    result, ckpt = train_fold(
        sub, 0, dataclasses.replace(backbone, settings=probe), device, where=f"{backbone.name} speed probe"
    )
    n = (len(tr) // s.batch_size) * s.batch_size if len(tr) > s.batch_size else len(tr)  # drop_last
    seconds = [row["epoch_seconds"] for row in result.history]
    return (n / seconds[0] if seconds else float("inf")), ckpt, result, n  # features+sklearn: no epochs


def measure_speed(
    data: PreparedData,
    backbone: Backbone,
    device: torch.device,
    predict_batch: int,
    batches: int,
    budget_s: float | None = None,
) -> tuple[Speed, str, int]:
    """(images/s training and predicting, the precision chosen, the batches timed) of one backbone as its
    stages will run: a warm-up pass of PROBE_WARMUP_BATCHES through `train_fold` (kernels chosen, buffers
    allocated: the process is then warm), then a timed pass of a fresh model over `probe_batches` batches
    (`batches` at most, fewer under a short `budget_s`), then `predict_outputs` on 4 predict batches after one
    (docs/probe.md)."""
    s = backbone.settings
    warm_speed, *_ = _probe_pass(data, backbone, device, min(batches, PROBE_WARMUP_BATCHES))
    train_speed, ckpt, result, n = _probe_pass(
        data, backbone, device, probe_batches(budget_s, warm_speed, s.batch_size, batches)
    )
    model = fold_model(ckpt, device, result.classifier)
    cfg = InputConfig.from_checkpoint(ckpt)
    images = Rows(data.train_images, np.arange(min(len(data.train), 5 * predict_batch)))
    warm, timed_images = images[:predict_batch], images[predict_batch:]
    task = data.task.for_model(ckpt)
    predict_outputs(model, warm, cfg, predict_batch, device, task)
    start = time.perf_counter()
    predict_outputs(model, timed_images, cfg, predict_batch, device, task)
    infer_speed = len(timed_images) / (time.perf_counter() - start) if len(timed_images) else float("inf")
    return (
        Speed(train=train_speed, infer=infer_speed),
        cfg.precision,
        max(1, n // s.batch_size),
    )  # a fold's rows at most


# ---------------------------------------------------------------- the plan


def choose_finetune(data: PreparedData, backbone: Backbone, epochs: float) -> dict:
    """`train.finetune: auto` for a backbone whose fold models train `epochs`: `full` when it starts from random
    weights (their frozen features carry nothing), or when each fold model gets at least UPDATES_FOR_FULL
    optimizer steps and its median class at least ROWS_PER_CLASS_FOR_FULL training rows; else
    `features+sklearn` (frozen pretrained features, `train.feature_layer`, into `train.sklearn_classifier`).
    {"finetune", "finetune_reason"}; {} when finetune is set in params."""
    s = backbone.settings
    if s.finetune != "auto":
        return {}
    k = data.n_folds
    rows = len(data.train) * (k - 1) / k  # a fold model's training part
    counts = data.task.class_counts(data.train["label"])
    per_class = (np.median(counts) if counts.size else len(data.train)) * (k - 1) / k
    updates = epochs * (rows // s.batch_size if rows > s.batch_size else 1)
    if not backbone.pretrained:
        return {"finetune": "full", "finetune_reason": "random weights: their frozen features carry nothing"}
    full = updates >= UPDATES_FOR_FULL and per_class >= ROWS_PER_CLASS_FOR_FULL
    figures = (
        f"{updates:,.0f} updates per fold model ({epochs:g} epochs of {rows // 1:,.0f} rows at batch {s.batch_size}) "
        f"and {per_class:,.0f} training rows in the median class; full needs >= {UPDATES_FOR_FULL} and "
        f">= {ROWS_PER_CLASS_FOR_FULL}"
    )
    return {"finetune": "full" if full else "features+sklearn", "finetune_reason": figures}


def regime_comparison_seconds(data: PreparedData, epochs: float, full: Speed, features: Speed) -> float:
    """What `compare_regimes` will cost: full fine-tuning's `epochs` over the inner split's training part (at
    the `full` speed) and one validation, and a features pass over every inner row (at the `features` speed)."""
    inner = len(data.train) * (data.n_folds - 1) / data.n_folds
    fit_rows, val_rows = inner * (COMPARE_PARTS - 1) / COMPARE_PARTS, inner / COMPARE_PARTS
    return 2 * FOLD_SETUP_S + epochs * fit_rows / full.train + val_rows / full.infer + inner / features.infer


def compare_regimes(
    data: PreparedData, backbone: Backbone, epochs: float, sides: tuple[int | None, int | None], device: torch.device
) -> dict:
    """`finetune: auto` measured: full fine-tuning for `epochs` (the last epoch kept) and features+sklearn, each at
    its side (`sides`: full's, features'), trained on an inner split of fold 0's training rows (`inner`: the
    other folds' rows in COMPARE_PARTS, one of which validates) and scored on its validation part under
    `train.monitor`; never on fold 0's rows or the holdout. {"finetune": the better (a tie: features+sklearn,
    the cheaper), "finetune_comparison": both scores and the rows}."""
    inner = data.inner(0, COMPARE_PARTS)
    y_val = inner.targets[inner.folds == 0]
    s, scores = backbone.settings, {}
    for regime, side in zip(("full", "features+sklearn"), sides):
        bb = as_size(as_regime(backbone, regime), side)
        run = dataclasses.replace(
            bb.settings, epochs=epochs, val_every=math.ceil(epochs), seeds=None, early_stopping_patience=None
        )
        where = f"{backbone.name} finetune comparison, {regime}"
        result, _ = train_fold(inner, 0, dataclasses.replace(bb, settings=run), device, where=where)
        scores[regime] = data.task.scores(result.val_probs, y_val)
    better = "full" if is_better_scores(s.monitor, scores["full"], scores["features+sklearn"]) else "features+sklearn"
    figures = {
        "monitor": s.monitor,
        **{regime: round(scores[regime][s.monitor], 4) for regime in scores},
        "epochs": epochs,
        "train_rows": int((inner.folds != 0).sum()),
        "val_rows": len(y_val),
        "sides": dict(zip(scores, sides)),
    }
    return {"finetune": better, "finetune_comparison": figures}


def side_candidates(data: PreparedData, backbone: Backbone) -> list[int]:
    """`train.image_size: auto`'s candidate input sides, largest first: SIDE_SHARES of the largest side, which
    is the cache's; for random weights the images' median native side (`PreparedData.native_side`) where that
    is smaller: above it an input shows no more detail, only costs more. Pretrained weights are not capped so:
    their features were learnt at ImageNet's object scale, and an upsampled input brings small photos nearer it
    (CIFAR-10's 32 px photos, Lite0: docs/image_size.md). [] when image_size is set."""
    if backbone.settings.image_size != "auto":
        return []
    cache, native = data.train_images.shape[1], data.native_side()
    top = min(cache, int(native)) if native and not backbone.pretrained else cache
    floor = min(top, MIN_SIDE)
    sides = {top} | {max(floor, int(top * share) // SIDE_MULTIPLE * SIDE_MULTIPLE) for share in SIDE_SHARES[1:]}
    return sorted(sides, reverse=True)


def as_size(backbone: Backbone, side: int | None) -> Backbone:
    """`backbone` trained at input `side` (the plan sizes and probes `image_size: auto`'s candidates with it;
    None: as it is)."""
    if side is None:
        return backbone
    settings = dataclasses.replace(backbone.settings, image_size=side)
    return dataclasses.replace(backbone, settings=settings, image_size=side)


def as_regime(backbone: Backbone, finetune: str) -> Backbone:
    """`backbone` trained in `finetune` mode (the plan sizes and probes `auto`'s candidates with it)."""
    if backbone.settings.finetune != "auto":
        return backbone
    return dataclasses.replace(backbone, settings=dataclasses.replace(backbone.settings, finetune=finetune))


def backbone_work(
    data: PreparedData,
    s: TrainSettings,
    tta_views: int,
    refit_models: int = 0,
    refit_views: int = 0,
    bag_test: bool = True,
    folds: int | None = None,
    chosen_views: int | None = None,
    select_rows: int | None = None,
) -> BackboneWork:
    """What a backbone's train, predict (and refit: `refit_models`, each predicting with `refit_views`) stages
    will do with these settings on this competition, training `folds` of its folds (None: all); without
    `bag_test` (refit.rule: replace) the fold models predict their OOF rows alone. The predict stage computes
    `tta_views` on the `select_rows` OOF rows the TTA choice is made on (None: all), the chosen policy's
    (`chosen_views` at most; None: as many) on the other OOF rows, test and holdout."""
    n, k = len(data.train), data.n_folds
    m = folds or k
    held = 0 if data.holdout is None else len(data.holdout)  # cv.holdout: predicted by every model, as test is
    seeds = len(s.seeds or [s.seed])
    oof = n * m / k
    chosen_on = oof if select_rows is None else min(oof, select_rows)
    chosen_views = tta_views if chosen_views is None else chosen_views
    return BackboneWork(
        epochs=s.epochs,
        val_every=s.val_every,
        fits=m * seeds,
        train_rows=n * (k - 1) / k,
        val_rows=n / k,
        val_models=2 if s.ema_decay else 1,
        predict_images=seeds
        * (chosen_on * tta_views + (oof - chosen_on + (m * (len(data.test) + held) if bag_test else 0)) * chosen_views),
        trains=s.finetune != "features+sklearn",
        refit_fits=refit_models,
        refit_rows=n,
        refit_predict_images=refit_models * (len(data.test) + held) * refit_views,
        folds=folds,
    )


def make_plan(
    budget_minutes: float,
    n_train: int,
    work: dict[str, BackboneWork],
    speeds: dict[str, Speed],
    done_s: dict[str, float],
) -> dict:
    """The plan of a run on `n_train` training rows: epochs per backbone and planned seconds per stage.
    `done_s`: the seconds of the stages already run (prepare, tune@..., this plan stage so far)."""
    n, backbones = n_train, list(work)
    later = {
        **{f"predict@{b}": predict_seconds(w, speeds[b]) for b, w in work.items()},
        **{f"refit@{b}": IDLE_STAGE_S for b, w in work.items() if not w.refit_fits},  # off: writes refit.json
        "ensemble": STAGE_OVERHEAD_S + ENSEMBLE_S_PER_ROW * n * len(backbones),
        "analyze": STAGE_OVERHEAD_S + ANALYZE_S_PER_ROW * n,
        "timing": STAGE_OVERHEAD_S,
    }
    stages = len(done_s) + 3 * len(backbones) + 3  # train, predict, refit per backbone; ensemble, analyze, timing
    fixed = {**done_s, **later, "dvc": DVC_GAP_S * stages}
    epochs = plan_epochs(budget_minutes * 60, fixed, work, speeds)
    planned = {
        **done_s,
        **{f"train@{b}": train_seconds(work[b], speeds[b], epochs[b]) for b in backbones},
        **{f"refit@{b}": refit_seconds(work[b], speeds[b], epochs[b]) for b in backbones if work[b].refit_fits},
        **later,
        "dvc": fixed["dvc"],
    }
    return {
        "budget_minutes": budget_minutes,
        "backbones": {
            b: {
                "epochs": epochs[b],
                **({} if work[b].folds is None else {"folds": work[b].folds}),
                "params_epochs": work[b].epochs,
                "val_every": planned_val_every(work[b], epochs[b]),
                "train_images_per_s": round(speeds[b].train, 1),
                "infer_images_per_s": round(speeds[b].infer, 1),
            }
            for b in backbones
        },
        "planned_seconds": {stage: round(s, 1) for stage, s in planned.items()},
        "planned_total_seconds": round(sum(planned.values()), 1),
    }


def short_of(plan: dict, share: float = 1.0) -> list[str]:
    """The backbones whose planned epochs fall short of `share` of their params epochs (what a model needs)."""
    return [b for b, e in plan["backbones"].items() if e["epochs"] < share * e["params_epochs"]]


def plan_scheme(
    budget_minutes: float,
    oof_rows: dict[int, int],
    schemes: dict[int, dict[str, BackboneWork]],
    speeds: dict[str, Speed],
    done_s: dict[str, float],
) -> dict:
    """`cv.train_folds: auto`: of `schemes` (folds trained -> every backbone's work; `oof_rows`: the OOF rows
    each leaves), the plan with the most folds in which every backbone trains at least its params epochs
    (`train.epochs`, tuned: what a model needs); if none does, the one with the fewest folds, whose models
    get the most epochs. Epochs below what a model needs cost more than folds beyond one buy (more OOF rows
    and bag members). A scheme whose one epoch per model does not fit is skipped; if every one is, the
    fewest folds' PipelineError names the smallest budget. The choice and its reason: the plan's `scheme`."""
    plans, error = {}, None
    for m in sorted(schemes, reverse=True):
        try:
            plans[m] = make_plan(budget_minutes, oof_rows[m], schemes[m], speeds, done_s)
        except PipelineError as e:
            error = e
    if not plans:
        raise error
    enough = [m for m, p in plans.items() if not short_of(p)]
    chosen = max(enough) if enough else min(plans)
    per = lambda m: ", ".join(f"{b} {e['epochs']:g}" for b, e in plans[m]["backbones"].items())  # noqa: E731
    tried = "; ".join(f"{m} fold{'s' if m > 1 else ''}: {per(m)}" for m in plans)
    reason = (
        f"the most folds whose models all get their params epochs (epochs per model at {tried})"
        if enough
        else f"no number of folds gives every model its params epochs, the fewest give the most ({tried})"
    )
    n_folds = max(schemes)
    return {**plans[chosen], "scheme": {"folds": chosen, "of": n_folds, "rule": "auto", "reason": reason}}


def plan_refit(without: dict, with_refit, folds: int) -> dict:
    """`refit.enabled: auto`: the plan `with_refit()` (`folds` trained, then the refit models on every row, each
    for the folds' epochs) where every model in it gets at least its params epochs (what a model needs), else
    `without` (no refit). With the refit replacing a fold bag the fold models only give the OOF rows the
    choices are fitted on, so under cv.train_folds: auto one fold trains: every epoch the plan has goes to the
    refit. Past what a model needs, one model on every row beats a bag on fewer (docs/refit.md); below it, the
    epochs a refit takes from the folds cost more than its rows buy. The choice and its reason: the plan's
    scheme (`refit`, `refit_reason`) and every backbone's `refit`."""
    try:
        candidate = with_refit()
    except PipelineError:  # not one epoch per model fits with the refit
        candidate = None
    per = lambda p: ", ".join(f"{b} {e['epochs']:g}" for b, e in p["backbones"].items())  # noqa: E731
    if candidate is not None and not short_of(candidate):
        plan, chosen = candidate, True
        scheme = {"folds": folds, "of": without["scheme"]["of"], "rule": "refit.enabled: auto"}
        scheme["reason"] = f"{folds} fold{'s' if folds > 1 else ''} for the OOF rows, then the refit"
        why = f"{folds} fold(s) and the refit get every model its params epochs (epochs per model: {per(candidate)})"
    else:
        plan, chosen, scheme = without, False, without["scheme"]
        got = "not one epoch fits" if candidate is None else f"epochs per model {per(candidate)}"
        why = f"with {folds} fold(s) and the refit a model gets less than its params epochs ({got})"
    for entry in plan["backbones"].values():
        entry.update(refit=chosen, refit_reason=why)
    return {**plan, "scheme": {**scheme, "refit": chosen, "refit_reason": why}}


def plan_tta(tta: TTAConfig, plan_with) -> dict:
    """The plan `plan_with(tta)`, or where it leaves a model short of its params epochs (or has not one epoch) the
    plan without TTA for every backbone whose policy is chosen on OOF (`tta.select: auto`), if that gives every
    model at least TTA_EPOCHS_GAIN times the epochs: below what a model needs, epochs buy more than TTA does.
    Each such backbone's `tta` ("none", or its select kept) and `tta_reason` in the plan; predict reads it."""
    try:
        plan, error = plan_with(tta), None
    except PipelineError as e:  # not one epoch per model with every TTA view: without, one may fit
        plan, error = None, e
    lean = tta.without_tta()
    if lean == tta or (plan is not None and not short_of(plan)):
        if plan is None:
            raise error
        return plan
    cheap = plan_with(lean)
    select = lambda t, b: t.backbones.get(b, t.select)  # noqa: E731
    dropped = [b for b in cheap["backbones"] if select(lean, b) != select(tta, b)]
    per = lambda p: ", ".join(f"{b} {e['epochs']:g}" for b, e in p["backbones"].items())  # noqa: E731
    gain = plan is None or all(
        e["epochs"] >= TTA_EPOCHS_GAIN * plan["backbones"][b]["epochs"] for b, e in cheap["backbones"].items()
    )
    with_tta = "not one epoch fits" if plan is None else per(plan)
    verdict = f"at least {TTA_EPOCHS_GAIN}x: no TTA" if gain else f"less than {TTA_EPOCHS_GAIN}x: TTA kept"
    why = f"without TTA the models get {per(cheap)} epochs, with it {with_tta} ({verdict})"
    chosen, kept = (cheap, "none") if gain else (plan, None)
    for b in dropped:
        chosen["backbones"][b].update(tta=kept or select(tta, b), tta_reason=why)
    return chosen


def write_plan(plan: dict, plan_dir: Path, report: str | Path) -> None:
    """`plan_dir`/<backbone>.json per backbone (so a change to one backbone's plan reruns only its train stage)
    and the whole plan in `report`."""
    with atomic_dir(plan_dir) as out:
        for backbone, entry in plan["backbones"].items():
            keys = ("epochs", "folds", "val_every", "finetune", "image_size", "refit", "tta")
            write_json(out / f"{backbone}.json", {k: entry[k] for k in keys if k in entry})
    write_json(report, plan)


def resolve_auto_precision(data: PreparedData, backbone: Backbone, device: torch.device) -> dict:
    """`precision: auto` resolved here, as train would (the cached fp32-vs-bf16 probe), for plan/<b>.json:
    the train stage reads the choice from there, so it is a DVC-visible input rather than a cache in
    the home folder, and a fresh machine given the same plan file trains the same way. {} otherwise."""
    s = backbone.settings
    if s.precision != "auto":
        return {}
    n_outputs = 0 if s.finetune == "features+sklearn" else data.task.n_outputs
    model = initial_model(backbone.model_name, n_outputs, s, s.seed, backbone.pretrained)
    size = backbone.image_size
    probe = lambda: cached_probe(model, backbone.model_name, s.finetune, s.batch_size, size, device)  # noqa: E731
    precision, figures = resolve_precision(s.precision, device, probe)
    return {"precision": precision, "precision_probe": figures}


def fixed_folds(train_folds: int | str | None, n_folds: int) -> int:
    """`cv.train_folds` where no plan chooses it: a number as it is; null, or auto without a budget: all."""
    return train_folds if isinstance(train_folds, int) else n_folds


def no_budget(
    data: PreparedData, backbones: dict[str, Backbone], device: torch.device, folds: int, refit: bool | str = False
) -> dict:
    """The plan of `budget.minutes: null`: params.yaml's epochs, `folds` trained, `image_size: auto` at its largest
    candidate (no time to trade for it), `finetune: auto` chosen for them (`choose_finetune`), `precision: auto`
    resolved in the regime and at the side chosen, and `refit` (refit.enabled) auto as no refit: with no time
    to trade, the fold bag of every fold trained."""
    entries = {}
    for b, bb in backbones.items():
        sides = side_candidates(data, bb)
        bb = as_size(bb, sides[0] if sides else None)
        choice = choose_finetune(data, bb, bb.settings.epochs)
        precision = resolve_auto_precision(data, as_regime(bb, choice.get("finetune", "full")), device)
        entries[b] = {"epochs": bb.settings.epochs, "folds": folds, "val_every": bb.settings.val_every}
        if sides:
            reason = f"no budget (budget.minutes: null): the largest of {_px(sides)}{_cap(data, bool(bb.pretrained))}"
            entries[b].update(image_size=sides[0], image_size_reason=reason)
        entries[b].update(**choice, **precision)
        if refit == "auto":
            entries[b].update(refit=False, refit_reason="no budget (budget.minutes: null): the fold bag")
    return {"budget_minutes": None, "backbones": entries}


def _px(sides: list[int]) -> str:
    return "/".join(map(str, sides)) + " px"


def _cap(data: PreparedData, pretrained: bool) -> str:
    native = data.native_side()
    if not native:
        of = ""
    elif pretrained:
        of = f"; pretrained weights: not capped at the images' median native side ({native:g} px)"
    else:
        of = f" and the images' median native side ({native:g} px)"
    return f" (at or below the cache's side, {data.train_images.shape[1]} px{of})"


def plan_run(
    params: Params, data: PreparedData, backbones: dict[str, Backbone], device: torch.device, timing_dir: Path
) -> dict:
    """Measure every backbone here (`measure_speed`; `finetune: auto` as full, its costly candidate;
    `image_size: auto` at its largest and smallest candidate sides, in the precision chosen at the largest, the
    sides between from those two: `speeds_by_side`), then `plan_from_speeds`, counting the seconds the stages
    before this one (prepare, tune) took, as recorded in `timing_dir` (reports/timing/), and this one's
    measuring so far."""
    speeds, precisions, probed, budget_s = {}, {}, {}, params.budget.minutes * 60
    for b, backbone in backbones.items():
        full, sides = as_regime(backbone, "full"), side_candidates(data, backbone)
        measured = {}
        for side in sorted({sides[0], sides[-1]}, reverse=True) if sides else [None]:
            probe = as_size(full, side)
            if b in precisions:  # the smaller side in the larger one's precision: one precision for every side
                fixed = dataclasses.replace(probe.settings, precision=precisions[b])
                probe = dataclasses.replace(probe, settings=fixed)
            measured[side], precision, batches = measure_speed(
                data, probe, device, params.predict.batch_size, params.budget.probe_batches, budget_s
            )
            precisions.setdefault(b, precision)
            probed.setdefault(b, batches)
        speeds[b] = speeds_by_side(measured, sides) if sides else measured[None]
    earlier = ["prepare"] + ([f"tune@{b}" for b in backbones] if params.tune.enabled else [])
    done = lambda: seconds_so_far({stage: timing_dir / f"{stage}.json" for stage in earlier}, "plan")  # noqa: E731
    plan = plan_measuring_regimes(params, data, backbones, speeds, done, device)
    for b in backbones:
        plan["backbones"][b].update(precision=precisions[b], probe_batches=probed[b])
    return plan


def plan_measuring_regimes(params: Params, data: PreparedData, backbones: dict[str, Backbone], speeds, done, device):
    """`plan_from_speeds`, with `finetune: auto` measured (`compare_regimes`) for each pretrained backbone where
    the budget allows: the plan with that backbone in full fine-tuning, the comparison's estimated seconds
    (`regime_comparison_seconds`) added to this stage's, still gives every model its params epochs. The
    comparison trains full for that plan's epochs at its side, features+sklearn at the largest; its winner is
    then fixed and the plan made again, counting the seconds it took (`done`(): the stages' seconds so far)."""
    plan, measured = plan_from_speeds(params, data, backbones, speeds, done()), {}
    speed_at = lambda b, side: speeds[b][side] if isinstance(speeds[b], dict) else speeds[b]  # noqa: E731
    fewest = data.task.class_counts(data.train["label"][data.folds != 0])  # in the rows the comparison splits
    for b, bb in backbones.items():
        if bb.settings.finetune != "auto" or not bb.pretrained:
            continue
        if fewest.size and fewest.min() < COMPARE_PARTS:  # not a row of that class in some inner part
            plan["backbones"][b]["finetune_reason"] += f"; not measured: a class under {COMPARE_PARTS} training rows"
            continue
        as_full = {**backbones, b: as_regime(bb, "full")}
        entry = plan_from_speeds(params, data, as_full, speeds, done())["backbones"][b]
        sides = (entry.get("image_size"), (side_candidates(data, bb) or [None])[0])
        cost = regime_comparison_seconds(data, entry["epochs"], speed_at(b, sides[0]), speed_at(b, sides[1]))
        so_far = done()
        after = plan_from_speeds(params, data, as_full, speeds, {**so_far, "plan": so_far["plan"] + cost})
        if short_of(after):
            plan["backbones"][b]["finetune_reason"] += (
                f"; not measured: a comparison ({cost:.0f} s) would leave a model under its params epochs"
            )
            continue
        measured[b] = compare_regimes(data, bb, after["backbones"][b]["epochs"], sides, device)
        backbones = {**backbones, b: as_regime(bb, measured[b]["finetune"])}
    if not measured:
        return plan
    plan = plan_from_speeds(params, data, backbones, speeds, done())
    for b, m in measured.items():
        c = m["finetune_comparison"]
        reason = (
            f"measured on an inner split of fold 0's training rows ({c['train_rows']:,} to train, {c['val_rows']:,}"
            f" to validate; never fold 0's rows or the holdout): {c['monitor']} full {c['full']:.4f} at "
            f"{c['epochs']:g} epochs, features+sklearn {c['features+sklearn']:.4f}"
        )
        plan["backbones"][b].update(finetune=m["finetune"], finetune_reason=reason, finetune_comparison=c)
    return plan


def plan_folds(
    params: Params,
    data: PreparedData,
    regimes: dict[str, Backbone],
    speeds: dict[str, Speed],
    done_s: dict[str, float],
    tta: TTAConfig,
) -> dict:
    """The plan of these backbones (`regimes`: each in its regime and at its side) at `speeds` with `tta`'s views:
    the folds trained (`plan_scheme` under cv.train_folds: auto, else as set) and, under refit.enabled: auto,
    whether to refit (`plan_refit`)."""
    k, train_folds, budget, refit = data.n_folds, params.cv.train_folds, params.budget.minutes, params.refit.enabled
    candidates = range(k, 0, -1) if train_folds == "auto" else [fixed_folds(train_folds, k)]
    oof_rows = {m: int((data.folds < m).sum()) for m in candidates}

    def schemes(refits_on: bool, folds) -> dict[int, dict[str, BackboneWork]]:
        """{m: every backbone's work with m folds trained} for m in `folds`, with or without the refit."""
        out = {m: {} for m in folds}
        for b, backbone in regimes.items():
            refits = len(params.refit.seeds or [backbone.settings.seed]) if refits_on else 0
            views, chosen, select = tta.views_computed(b), tta.views_chosen_at_most(b), tta.select_rows
            bag_test = not (refits_on and params.refit.rule == "replace")
            for m in folds:
                out[m][b] = backbone_work(data, backbone.settings, views, refits, chosen, bag_test, m, chosen, select)
        return out

    work = schemes(refit is True, candidates)
    if train_folds == "auto":
        plan = plan_scheme(budget, oof_rows, work, speeds, done_s)
    else:
        (m,) = candidates
        plan = make_plan(budget, oof_rows[m], work[m], speeds, done_s)
        plan = {**plan, "scheme": {"folds": m, "of": k, "rule": "cv.train_folds", "reason": "as params.yaml sets it"}}
    if refit != "auto":
        return plan
    m = 1 if train_folds == "auto" else candidates[0]
    return plan_refit(plan, lambda: make_plan(budget, oof_rows[m], schemes(True, [m])[m], speeds, done_s), m)


def plan_from_speeds(
    params: Params,
    data: PreparedData,
    backbones: dict[str, Backbone],
    speeds: dict[str, Speed | dict[int, Speed]],
    done_s: dict[str, float],
) -> dict:
    """The plan for these speeds (`speeds`[b]: a Speed, or {side: Speed} at every candidate side of `image_size:
    auto`): the folds trained (`plan_scheme` under cv.train_folds: auto, else as set), every backbone's epochs
    (`make_plan`), the input side of `image_size: auto` and the regime of `finetune: auto`.

    The side: of the candidates (`side_candidates`, largest first, every auto backbone a step down together), the
    largest at which every backbone trains at least its params epochs (what a model needs: a smaller input buys
    more updates), else the smallest; resolution before folds, since each side's plan then takes the most folds
    that still fit. The regime: chosen from that plan's epochs as `full` (`choose_finetune`); where it picks
    features+sklearn (one fit, no epochs: at the largest side) the plan is made again with it."""

    def plan_as(regimes: dict[str, Backbone], speeds_now: dict[str, Speed]) -> dict:
        return plan_tta(params.tta, lambda tta: plan_folds(params, data, regimes, speeds_now, done_s, tta))

    sides = {b: side_candidates(data, bb) for b, bb in backbones.items()}
    side = lambda b, level: sides[b][min(level, len(sides[b]) - 1)] if sides[b] else None  # noqa: E731

    def plan_at(levels: dict[str, int], regimes: dict[str, str]) -> dict:
        sized = {b: as_size(as_regime(bb, regimes[b]), side(b, levels[b])) for b, bb in backbones.items()}
        at = {b: speeds[b][side(b, levels[b])] if sides[b] else speeds[b] for b in backbones}
        return plan_as(sized, at)

    full = {b: "full" for b in backbones}
    tried = plans_by_side(lambda level: plan_at(dict.fromkeys(backbones, level), full), max(map(len, sides.values())))
    level = next((i for i, p in tried.items() if not short_of(p, SIDE_EPOCHS_SHARE)), max(tried))
    plan = tried[level]
    choices = {b: choose_finetune(data, bb, plan["backbones"][b]["epochs"]) for b, bb in backbones.items()}
    regimes = {b: choices[b].get("finetune", "full") for b in backbones}
    levels = {b: level if regimes[b] == "full" else 0 for b in backbones}
    if any(r == "features+sklearn" for r in regimes.values()):
        plan = plan_at(levels, regimes)
    for b in backbones:
        plan["backbones"][b].update(choices[b])
        if sides[b]:
            choice = side_choice(b, sides[b], tried, level, regimes[b], data, bool(backbones[b].pretrained))
            plan["backbones"][b].update(choice)
    return plan


def plans_by_side(plan_at, levels: int) -> dict[int, dict]:
    """{level: `plan_at`(level)} for the candidate sides' levels 0..levels-1 (at least one) where one epoch per
    model fits; if none does, the smallest side's PipelineError, which names the smallest budget."""
    tried, error = {}, None
    for level in range(levels or 1):
        try:
            tried[level] = plan_at(level)
        except PipelineError as e:  # not one epoch per model at this side: a smaller one may fit
            error = e
    if not tried:
        raise error
    return tried


def side_choice(
    b: str, sides: list[int], tried: dict[int, dict], level: int, regime: str, data: PreparedData, pretrained: bool
) -> dict:
    """`image_size: auto`'s choice for backbone `b` and its reason: `level` of the sides `tried` as full
    fine-tuning (a side missing: not one epoch fits), with the epochs each gives; features+sklearn: the largest."""
    at = lambda i: sides[min(i, len(sides) - 1)]  # noqa: E731
    cap = _cap(data, pretrained)
    per = "; ".join(f"{at(i)} px: {p['backbones'][b]['epochs']:g} epochs" for i, p in tried.items())
    need = tried[level]["backbones"][b]["params_epochs"]
    if regime == "features+sklearn":
        reason = f"features+sklearn: one pass, no epochs to buy, so the largest of {_px(sides)}{cap}"
    elif not short_of(tried[level], SIDE_EPOCHS_SHARE):
        reason = (
            f"the largest side at which every model gets its params epochs ({need}, from "
            f"{SIDE_EPOCHS_SHARE:.0%} of them: {per}){cap}"
        )
    else:
        reason = f"no side gives every model its params epochs ({need}), the smallest the most ({per}){cap}"
    return {"image_size": at(0 if regime == "features+sklearn" else level), "image_size_reason": reason}


def log_plan(plan: dict, tracker, report: str) -> None:
    """The plan stage's MLflow run: every backbone's plan as params, planned seconds per stage as metrics."""
    run_params = {
        "budget_minutes": plan["budget_minutes"],
        **{f"{b}.{k}": v for b, e in plan["backbones"].items() for k, v in e.items()},
    }
    with tracker.run("plan", params=run_params, tags={"stage": "plan"}):
        tracker.log_metrics({f"planned_s.{stage.replace('@', '/')}": s for stage, s in plan["planned_seconds"].items()})
        tracker.log_artifact(report)
