"""`analyze` stage: out-of-fold error analysis of every backbone and of the ensemble.

    python -m pipeline analyze    # writes reports/oof/ (open reports/oof/index.html in a browser)

Where the models fail and which augmentation would help, from the OOF probabilities alone (never
the test set): scores per fold and per class, the confusion matrix and the most-confused pairs,
the worst and the confidently wrong images, calibration, error rates by image property with advice,
and how the backbones differ. The figures and HTML are drawn by `pipeline/report.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_fscore_support

from pipeline.config import Params, resolve_train_settings
from pipeline.data import PreparedData, default_augment
from pipeline.io import read_json
from pipeline.metrics import argbest, fold_spread, proxy_of
from pipeline.report import ModelAnalysis, never_predicted
from pipeline.slices import advise, image_properties, slice_errors
from pipeline.tasks import Task

# ---------------------------------------------------------------- scores


def per_class_scores(probs: np.ndarray, pred: np.ndarray, y: np.ndarray, task: Task) -> pd.DataFrame:
    """One row per class (label), from each row's prediction `pred`: precision, recall, f1, support, how
    often it is predicted (an imbalanced competition's rare class may never be: see `never_predicted`),
    and the task's extra columns (multi-label: AUC, missed, invented)."""
    labels = np.arange(len(task.classes))
    p, r, f1, support = precision_recall_fscore_support(task.truth(y), pred, labels=labels, zero_division=0)
    return pd.DataFrame(
        {
            "class": task.classes,
            "precision": p,
            "recall": r,
            "f1": f1,
            "support": support,
            "predicted": task.predicted_counts(pred),
            **task.per_class_extras(probs, y),
        }
    )


def fold_scores(probs: np.ndarray, y: np.ndarray, folds: np.ndarray, task: Task) -> pd.DataFrame:
    """The task's scores of each fold's validation rows (rows: fold 0..k-1), then `mean` and `std` across folds."""
    rows = {
        str(k): {"rows": int((folds == k).sum()), **task.scores(probs[folds == k], y[folds == k])}
        for k in np.unique(folds)
    }
    table = pd.DataFrame.from_dict(rows, orient="index")
    spread = pd.DataFrame({m: fold_spread(table[m]) for m in table.columns if m != "rows"}, index=["mean", "std"])
    table = pd.concat([table, spread])
    table["rows"] = table["rows"].astype("Int64")  # empty for mean and std
    return table


# ---------------------------------------------------------------- confusion and worst predictions


def most_confused_pairs(cm: np.ndarray, k: int) -> list[tuple[int, int, int]]:
    """The k largest off-diagonal cells as (true, predicted, count), largest first; empty cells left out."""
    off = cm.astype(np.int64).copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:k]
    return [(int(i), int(j), int(off[i, j])) for i, j in zip(*np.unravel_index(order, off.shape)) if off[i, j] > 0]


def worst_rows(losses: np.ndarray, k: int) -> np.ndarray:
    """Row indices of the k highest row `losses` (the task's), worst first."""
    return np.argsort(-losses, kind="stable")[:k]


def confident_wrong_rows(confidence: np.ndarray, wrong: np.ndarray, k: int) -> np.ndarray:
    """Row indices of the k wrong predictions made with the highest `confidence` (label noise suspects)."""
    wrong = np.flatnonzero(wrong)
    return wrong[np.argsort(-confidence[wrong], kind="stable")][:k]


# ---------------------------------------------------------------- calibration


def reliability_table(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> pd.DataFrame:
    """Equal-width bins (lo, hi] of each decision's `confidence` (the task's: the predicted class's
    probability, or each label's max(p, 1 - p)): decisions, mean confidence and accuracy per bin (empty
    bins kept)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    b = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    rows = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(b, weights=confidence, minlength=n_bins) / rows
        acc = np.bincount(b, weights=correct, minlength=n_bins) / rows
    return pd.DataFrame({"lo": edges[:-1], "hi": edges[1:], "rows": rows, "confidence": mean_conf, "accuracy": acc})


def expected_calibration_error(table: pd.DataFrame) -> float:
    """ECE = sum over bins of (rows in bin / all rows) * |accuracy - mean confidence|."""
    used = table[table["rows"] > 0]
    return float((used["rows"] / used["rows"].sum() * (used["accuracy"] - used["confidence"]).abs()).sum())


# ---------------------------------------------------------------- image properties and slices


# ---------------------------------------------------------------- models side by side


def diversity(preds: dict[str, np.ndarray], y: np.ndarray, task: Task) -> pd.DataFrame:
    """Per pair of models, from each one's predicted labels: disagreement (share of rows with different
    predictions), correlation of their error indicators, share of rows both get wrong, and the accuracy of
    an oracle picking the right one (a row is wrong as the task's `errors` says)."""
    names = list(preds)
    wrong = {m: task.errors(preds[m], y) for m in names}
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            ea, eb = wrong[a].astype(float), wrong[b].astype(float)
            corr = float(np.corrcoef(ea, eb)[0, 1]) if ea.std() > 0 and eb.std() > 0 else float("nan")
            rows.append(
                {
                    "a": a,
                    "b": b,
                    "disagreement": float(task.errors(preds[a], preds[b]).mean()),
                    "error_correlation": corr,
                    "both_wrong": float((wrong[a] & wrong[b]).mean()),
                    "oracle_accuracy": float(1 - (wrong[a] & wrong[b]).mean()),
                }
            )
    return pd.DataFrame(rows, columns=["a", "b", "disagreement", "error_correlation", "both_wrong", "oracle_accuracy"])


def per_class_accuracy(preds: dict[str, np.ndarray], y: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Rows: classes (labels); columns: models (their predictions); values: recall (the share of that class's
    rows predicted as it), nan for a class without rows."""
    labels = np.arange(len(classes))
    recall = {}
    for m, p in preds.items():
        r, support = precision_recall_fscore_support(y, p, labels=labels, zero_division=0)[1::2]
        recall[m] = np.where(support > 0, r, np.nan)
    return pd.DataFrame(recall, index=classes)


# ---------------------------------------------------------------- one model's analysis


def analyze_model(
    name: str,
    probs: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    task: Task,
    properties: pd.DataFrame,
    augment: list[dict] | None,
    top_k: int,
    pairs: int,
    calibration_bins: int,
    slice_buckets: int,
    alpha: float,
    where: str,
    metric: str = "accuracy",
    ensemble: bool = False,
) -> ModelAnalysis:
    """Everything the report shows for one model's OOF predictions, each row's label and loss as the task
    gives them; its scores lead with `metric` (the competition's), in the report's tables and in
    `dvc metrics show`."""
    pred, losses = task.predicted(probs), task.row_losses(probs, y)
    reliability = reliability_table(*task.calibration(probs, pred, y), calibration_bins)
    cm = task.confusion(pred, y)
    wrong = task.errors(pred, y)
    slices = slice_errors(wrong, properties, slice_buckets, alpha)
    return ModelAnalysis(
        name=name,
        probs=probs,
        pred=pred,
        losses=losses,
        scores=task.scores(probs, y, dict.fromkeys([metric, *task.METRICS])),
        folds=fold_scores(probs, y, folds, task),
        per_class=per_class_scores(probs, pred, y, task),
        confusion=cm,
        pairs=most_confused_pairs(cm, pairs),
        worst=worst_rows(losses, top_k),
        confident_wrong=confident_wrong_rows(task.confidence(probs), wrong, top_k),
        reliability=reliability,
        ece=expected_calibration_error(reliability),
        slices=slices,
        ensemble=ensemble,
        advice=advise(slices, augment, where),
    )


# ---------------------------------------------------------------- what to try next

CALIBRATED = 0.02  # mean accuracy and mean confidence within this: calibrated
MORE_EPOCHS_SHARE = 0.5  # more epochs pay when at least this share of folds was best at its last validation
RESOLUTION_SHARE = 0.9  # an input below this share of the images' native side may be what limits the model


def calibration_gap(reliability: pd.DataFrame) -> float:
    """Mean accuracy minus mean confidence over every decision: > 0 under-confident, < 0 over-confident."""
    used = reliability[reliability["rows"] > 0]
    rows = used["rows"].to_numpy(dtype=float)
    return float(((used["accuracy"] - used["confidence"]).to_numpy() * rows).sum() / max(rows.sum(), 1.0))


def _weakest(a: ModelAnalysis, word: str) -> dict | None:
    present = a.per_class[a.per_class["support"] > 0].sort_values(["recall", "class"], kind="stable")
    if len(present) < 2:
        return None
    first, rest = present.iloc[0], present.iloc[1:3]
    then = ", ".join(f"{r['class']} ({r['recall']:.2f})" for _, r in rest.iterrows())
    return {
        "kind": "weakest",
        "class": str(first["class"]),
        "recall": float(first["recall"]),
        "support": int(first["support"]),
        "text": f"Weakest {word}: {first['class']}, recall {first['recall']:.2f} of {int(first['support'])} rows; "
        f"then {then}.",
    }


def _top_confusion(a: ModelAnalysis, classes: list[str], word: str) -> dict | None:
    if not a.pairs:
        return None
    t, p, n = a.pairs[0]
    support = int(a.per_class["support"].iloc[t])
    share = n / max(support, 1)
    return {
        "kind": "confusion",
        "true": classes[t],
        "predicted": classes[p],
        "count": int(n),
        "share": share,
        "text": f"Top confusion: {classes[t]} predicted as {classes[p]}, {n} of {support} {classes[t]} rows "
        f"({share:.0%}); its examples are below. If what tells them apart is a detail, a higher resolution; "
        f"if it is a pose or a colour, the augmentation that varies it.",
    }


def _calibration(a: ModelAnalysis, label_smoothing: float | None) -> dict:
    gap = calibration_gap(a.reliability)
    direction = "calibrated" if abs(gap) < CALIBRATED else "under-confident" if gap > 0 else "over-confident"
    if direction == "calibrated":
        text = f"Calibrated: confidence is within {CALIBRATED:.0%} of accuracy on average (ECE {a.ece:.3f})."
    elif direction == "under-confident":
        fix = (
            f"lower train.label_smoothing (now {label_smoothing:g})"
            if label_smoothing
            else "a temperature below 1 on the logits"
        )
        text = (
            f"Under-confident: accuracy exceeds confidence by {gap:.1%} on average (ECE {a.ece:.3f}): {fix}; a "
            "log-loss competition gets a temperature fitted on OOF (the ensemble's temperature step)."
        )
    else:
        text = (
            f"Over-confident: confidence exceeds accuracy by {-gap:.1%} on average (ECE {a.ece:.3f}): label "
            "smoothing or mixup in training, or a temperature above 1 (for a log-loss competition the ensemble's "
            "temperature step fits one on OOF)."
        )
    return {"kind": "calibration", "direction": direction, "gap": gap, "text": text}


def _epochs(report: dict) -> dict | None:
    curves = {k: c for k, c in (report.get("curves") or {}).items() if c}
    if not curves:  # features+sklearn: no epochs
        return None
    monitor = report.get("monitor") or "log_loss"
    key = f"val_{monitor}"
    validated = {k: [(r["epoch"], r[key]) for r in c if key in r] for k, c in curves.items()}
    epochs = max(len(c) for c in curves.values())
    fewest = min(len(v) for v in validated.values())
    if fewest < 3:
        return {
            "kind": "epochs",
            "verdict": "unknown",
            "text": f"Epochs: no curve to read (each fold validated {fewest} time(s) in {epochs} epochs); "
            "train.val_every: 1 shows whether more epochs pay.",
        }
    best = [v[argbest(monitor, [score for _, score in v])] for v in validated.values()]
    last = sum(epoch == v[-1][0] for (epoch, _), v in zip(best, validated.values()))
    peaks = [epoch for epoch, _ in best]
    if last >= MORE_EPOCHS_SHARE * len(validated):
        verdict = "more"
        text = (
            f"Epochs: {monitor} was still at its best on the last validation in {last} of {len(validated)} folds "
            f"({epochs} epochs): more epochs (a larger budget.minutes, or train.epochs) are likely to pay."
        )
    else:
        verdict = "enough"
        text = (
            f"Epochs: the folds peaked at epochs {', '.join(map(str, peaks))} of {epochs} ({monitor}): more "
            "epochs are unlikely to pay; stronger augmentation or regularisation may."
        )
    return {"kind": "epochs", "verdict": verdict, "folds_best_last": last, "text": text}


def _resolution(input_size: int | None, native: float | None) -> dict | None:
    if not input_size or not native:
        return None
    native = int(native)
    if input_size >= RESOLUTION_SHARE * native:
        return {
            "kind": "resolution",
            "verdict": "enough",
            "text": f"Resolution: the network sees {input_size} px of images of {native} px (median short side): "
            "their detail is all there.",
        }
    return {
        "kind": "resolution",
        "verdict": "higher",
        "text": f"Resolution: the network sees {input_size} px of images of {native} px (median short side): "
        f"a larger train.image_size (up to {native}, prepare.image_size at least as large) may pay, at about "
        f"{(native / input_size) ** 2:.1f}x the cost per epoch.",
    }


def plan_choices(entry: dict | None) -> dict | None:
    """The choices the plan stage made for a backbone (its entry in reports/plan.json) of what params.yaml
    left to it, `image_size: auto`, `finetune: auto`, `refit.enabled: auto` and TTA under a budget, with their
    reasons; None where it made none."""
    keys = ("image_size", "finetune", "refit", "tta")
    made = [(key, entry[key], entry[f"{key}_reason"]) for key in keys if f"{key}_reason" in (entry or {})]
    if not made:
        return None
    shown = lambda v: {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v  # noqa: E731
    text = "; ".join(f"{key} {shown(value)} (auto: {reason})" for key, value, reason in made)
    return {"kind": "plan", **{key: value for key, value, _ in made}, "text": f"Plan: {text}."}


def next_steps(
    a: ModelAnalysis,
    task: Task,
    train_report: dict | None = None,
    native: float | None = None,
    label_smoothing: float | None = None,
    plan_entry: dict | None = None,
) -> list[dict]:
    """The report's top lines for one model, each {kind, text, the values it states}: its weakest class with
    its recall, its top confusion with its share, its calibration and the fix, and for a backbone (its
    `train_report`: reports/train/<b>.json) whether more epochs (its folds' curves) or a higher input size
    (against the images' `native` median short side) are likely to pay, and what its `plan_entry` (in
    reports/plan.json) chose for it."""
    steps = [_weakest(a, task.CLASS_WORD), _top_confusion(a, task.classes, task.CLASS_WORD)]
    if task.HAS_CONFIDENCE:
        steps.append(_calibration(a, label_smoothing))
    if train_report:
        steps += [_epochs(train_report), _resolution(train_report.get("input_size"), native)]
    steps.append(plan_choices(plan_entry))
    return [s for s in steps if s is not None]


def summary(analyses: list[ModelAnalysis], div: pd.DataFrame) -> dict:
    """Headline numbers for `dvc metrics show`: a block per backbone, the ensemble's, one per pair of backbones."""
    out = {"backbones": {}, "pairs": {}}
    for a in analyses:
        metric = next(iter(a.scores))  # the competition's: the scores lead with it
        block = {
            **a.scores,
            "ece": a.ece,
            f"fold_{metric}_mean": float(a.folds.loc["mean", metric]),
            f"fold_{metric}_std": float(a.folds.loc["std", metric]),
            "weak_slices": int(a.slices["weak"].sum()),
            "never_predicted_classes": len(never_predicted(a.per_class)),
            **{f"holdout_{m}": v for m, v in (a.holdout or {}).items()},
        }
        if a.ensemble:
            out["ensemble"] = block
        else:
            out["backbones"][a.name] = block
    for row in div.itertuples():
        out["pairs"][f"{row.a}~{row.b}"] = {
            "disagreement": row.disagreement,
            "error_correlation": row.error_correlation,
            "oracle_accuracy": row.oracle_accuracy,
        }
    return out


def analyze_all(
    params: Params, oof: dict[str, np.ndarray], ensemble_oof: np.ndarray, data: PreparedData, properties: pd.DataFrame
) -> list[ModelAnalysis]:
    """`analyze_model` of every backbone's OOF (its advice checked against the augmentation it trained
    with), then of the ensemble's (its members may differ, so no "already on" check)."""
    cfg = params.analyze
    kwargs = dict(
        top_k=cfg.top_k,
        pairs=cfg.confused_pairs,
        calibration_bins=cfg.calibration_bins,
        slice_buckets=cfg.slice_buckets,
        alpha=cfg.significance,
        metric=params.competition.metric,
    )
    rows = (data.targets, data.folds, data.task, properties)
    analyses = []
    for name, probs in oof.items():
        augment = resolve_train_settings(params.train, name).augment or default_augment(data.train_images.shape[1])
        where = f"train.backbones.{name}.augment" if params.train.backbones[name].augment else "train.augment"
        analyses.append(analyze_model(name, probs, *rows, augment, where=where, **kwargs))
    analyses.append(
        analyze_model("ensemble", ensemble_oof, *rows, None, where="train.augment", ensemble=True, **kwargs)
    )
    return analyses


@dataclass(frozen=True)
class StageAnalysis:
    """What the analyze stage found: one analysis per backbone and the ensemble's, the backbones side by
    side, each model's per-class accuracy, and the headline numbers."""

    analyses: list[ModelAnalysis]
    diversity: pd.DataFrame
    per_class: pd.DataFrame
    headline: dict


def attach_next_steps(
    analyses: list[ModelAnalysis], params: Params, data: PreparedData, train_reports, plan_report: Path | None = None
) -> None:
    """Each model's `next_steps`; a backbone's read with its train report (`train_reports`(name): a path) and
    its entry in `plan_report` (reports/plan.json)."""
    native = data.native_side()
    plan = read_json(plan_report) if plan_report is not None and Path(plan_report).exists() else {}
    for a in analyses:
        if a.ensemble:
            a.next_steps = next_steps(a, data.task, label_smoothing=params.train.label_smoothing)
            continue
        path = Path(train_reports(a.name))
        report = read_json(path) if path.exists() else None
        smoothing = resolve_train_settings(params.train, a.name).label_smoothing
        entry = plan.get("backbones", {}).get(a.name)
        a.next_steps = next_steps(a, data.task, report, native, smoothing, entry)


def analyze_stage(
    params: Params,
    data: PreparedData,
    predictions: Path,
    submissions: Path,
    ensemble_report: Path,
    train_reports=lambda name: Path("reports/train") / f"{name}.json",
    plan_report: Path | None = None,
) -> StageAnalysis:
    """The stage's analysis: every backbone's OOF predictions (`predictions`/<b>/oof_probs.csv) and the
    ensemble's honest ones (`submissions`/oof_probs.csv), read as the task reads them; with `cv.holdout`,
    the held-out scores of `ensemble_report` (reports/ensemble.json) beside them; each backbone's train
    report (`train_reports`(name)) for its epochs and input size, and what the plan chose (`plan_report`)."""
    task, ids, y = data.task, data.train["id"].to_numpy(), data.targets
    oof = {b: task.read_predictions(Path(predictions) / b / "oof_probs.csv", ids, b) for b in params.train.backbones}
    ensemble = task.read_predictions(Path(submissions) / "oof_probs.csv", ids, "ensemble")
    properties = image_properties(data.train_images, data.train.get("width"), data.train.get("height"))
    analyses = analyze_all(params, oof, ensemble, data, properties)
    report = read_json(ensemble_report) if Path(ensemble_report).exists() else {}
    step = report.get("methods", {}).get(report.get("method"), {}).get("postprocess", {})
    if "thresholds" in step:  # the ensemble's fitted per-label thresholds beside its per-label scores
        thresholds = step["thresholds"]
        analyses[-1].per_class["threshold"] = [thresholds[c] for c in task.classes]
    if data.holdout is not None:
        attach_holdout(analyses, report)
    attach_next_steps(analyses, params, data, train_reports, plan_report)
    div = diversity({a.name: a.pred for a in analyses if not a.ensemble}, y, task)
    per_class = per_class_accuracy({a.label: a.pred for a in analyses}, task.truth(y), task.classes)
    return StageAnalysis(analyses, div, per_class, summary(analyses, div))


def attach_holdout(analyses: list[ModelAnalysis], report: dict) -> None:
    """With `cv.holdout`, each model's scores on the held-out rows from the ensemble stage's report."""
    for a in analyses:
        a.holdout = report.get("holdout") if a.ensemble else report.get("backbones", {}).get(a.name, {}).get("holdout")


def headline_line(a: ModelAnalysis, metric: str, hint: str = Task.NEVER_PREDICTED_HINT) -> str:
    """One model's line in the stage's log: OOF scores, calibration, its first advice."""
    missing = never_predicted(a.per_class)
    shown = dict.fromkeys([metric, "accuracy" if "accuracy" in a.scores else proxy_of(a.scores)])
    return (
        f"{a.name}: OOF "
        + ", ".join(f"{m} {a.scores[m]:.4f}" for m in shown)
        + f", ECE {a.ece:.4f}, "
        + (f"holdout {metric} {a.holdout[metric]:.4f}, " if a.holdout else "")
        + f"{len(a.advice)} weak slice(s)"
        + (f"; {a.advice[0]['augmentation']}" if a.advice else "")
        + (f"; never predicts class {', '.join(missing[:5])} ({hint})" if missing else "")
    )
