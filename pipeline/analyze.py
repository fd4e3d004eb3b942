"""`analyze` stage: out-of-fold error analysis of every backbone and of the ensemble.

    python -m pipeline analyze    # writes reports/oof/ (open reports/oof/index.html in a browser)

Where the models fail and which augmentation would help, from the OOF probabilities alone (never
the test set): scores per fold and per class, the confusion matrix and the most-confused pairs,
the worst and the confidently wrong images, calibration, error rates by image property with advice,
and how the backbones differ. The figures and HTML are drawn by `pipeline/report.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import fisher_exact
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from pipeline.config import Params, resolve_train_settings
from pipeline.data import PreparedData, default_augment
from pipeline.metrics import METRICS, fold_spread, scores

# ---------------------------------------------------------------- scores


def per_class_scores(probs: np.ndarray, y: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """One row per class: precision, recall, f1, support, how often it is predicted (an imbalanced
    competition's rare class may never be: see `never_predicted`)."""
    pred = probs.argmax(1)
    p, r, f1, support = precision_recall_fscore_support(y, pred, labels=np.arange(len(classes)), zero_division=0)
    return pd.DataFrame(
        {
            "class": classes,
            "precision": p,
            "recall": r,
            "f1": f1,
            "support": support,
            "predicted": np.bincount(pred, minlength=len(classes)),
        }
    )


def never_predicted(per_class: pd.DataFrame) -> list[str]:
    """Classes with rows that the model never predicts: the sign that it learned the class prior
    instead (try train.class_weight or train.sampler: balanced)."""
    return per_class.loc[(per_class["predicted"] == 0) & (per_class["support"] > 0), "class"].astype(str).tolist()


def fold_scores(probs: np.ndarray, y: np.ndarray, folds: np.ndarray) -> pd.DataFrame:
    """Scores of each fold's validation rows (rows: fold 0..k-1), then `mean` and `std` across folds."""
    rows = {
        str(k): {"rows": int((folds == k).sum()), **scores(probs[folds == k], y[folds == k], METRICS)}
        for k in np.unique(folds)
    }
    table = pd.DataFrame.from_dict(rows, orient="index")
    spread = pd.DataFrame({m: fold_spread(table[m]) for m in table.columns if m != "rows"}, index=["mean", "std"])
    table = pd.concat([table, spread])
    table["rows"] = table["rows"].astype("Int64")  # empty for mean and std
    return table


# ---------------------------------------------------------------- confusion and worst predictions


def confusion_counts(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts: row = true class, column = predicted class (scikit-learn's)."""
    return confusion_matrix(y, pred, labels=np.arange(n_classes))


def most_confused_pairs(cm: np.ndarray, k: int) -> list[tuple[int, int, int]]:
    """The k largest off-diagonal cells as (true, predicted, count), largest first; empty cells left out."""
    off = cm.astype(np.int64).copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:k]
    return [(int(i), int(j), int(off[i, j])) for i, j in zip(*np.unravel_index(order, off.shape)) if off[i, j] > 0]


def row_losses(probs: np.ndarray, y: np.ndarray, eps: float = 1e-15) -> np.ndarray:
    return -np.log(np.clip(probs[np.arange(len(y)), y], eps, 1.0))


def worst_rows(probs: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Row indices of the k highest-loss predictions, worst first."""
    return np.argsort(-row_losses(probs, y), kind="stable")[:k]


def confident_wrong_rows(probs: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Row indices of the k wrong predictions made with the highest confidence (label noise suspects)."""
    wrong = np.flatnonzero(probs.argmax(1) != y)
    return wrong[np.argsort(-probs[wrong].max(1), kind="stable")][:k]


# ---------------------------------------------------------------- calibration


def reliability_table(probs: np.ndarray, y: np.ndarray, n_bins: int) -> pd.DataFrame:
    """Equal-width confidence bins (lo, hi]: rows, mean confidence and accuracy per bin (empty bins kept)."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == y
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

PROPERTIES = {  # name -> what a bucket's values mean, for the report
    "brightness": "mean luma, 0-255",
    "contrast": "std of luma (RMS contrast)",
    "colourfulness": "Hasler-Suesstrunk colourfulness",
    "sharpness": "variance of the Laplacian of luma (low = blurry)",
    "scale": "original size, sqrt(width x height) px",
    "aspect": "original width / height",
}


def image_properties(
    images: np.ndarray, width: np.ndarray | None = None, height: np.ndarray | None = None
) -> pd.DataFrame:
    """Per-image properties computed from uint8 (N, H, W, 3) pixels, plus the original scale and aspect
    ratio when `width`/`height` are given and vary (a cache of one size says nothing about them)."""
    out = {name: np.empty(len(images)) for name in ("brightness", "contrast", "colourfulness", "sharpness")}
    for start in range(0, len(images), 2048):
        x = np.asarray(images[start : start + 2048], dtype=np.float32)
        r, g, b = x[..., 0], x[..., 1], x[..., 2]
        luma = 0.299 * r + 0.587 * g + 0.114 * b
        rg, yb = r - g, 0.5 * (r + g) - b
        lap = luma[:, :-2, 1:-1] + luma[:, 2:, 1:-1] + luma[:, 1:-1, :-2] + luma[:, 1:-1, 2:] - 4 * luma[:, 1:-1, 1:-1]
        sl = slice(start, start + len(x))
        out["brightness"][sl] = luma.mean((1, 2))
        out["contrast"][sl] = luma.std((1, 2))
        out["colourfulness"][sl] = np.sqrt(rg.std((1, 2)) ** 2 + yb.std((1, 2)) ** 2) + 0.3 * np.sqrt(
            rg.mean((1, 2)) ** 2 + yb.mean((1, 2)) ** 2
        )
        out["sharpness"][sl] = lap.var((1, 2))
    if width is not None and height is not None:
        width, height = np.asarray(width, dtype=float), np.asarray(height, dtype=float)
        if len(np.unique(width * height)) > 1:
            out["scale"] = np.sqrt(width * height)
        if len(np.unique(width / height)) > 1:
            out["aspect"] = width / height
    return pd.DataFrame(out)


def slice_errors(
    wrong: np.ndarray, properties: pd.DataFrame, n_buckets: int, alpha: float, min_ratio: float = 1.5
) -> pd.DataFrame:
    """Error rate per quantile bucket of each property, against the rest of the rows.

    A bucket is `weak` when its error rate is at least `min_ratio` x the overall rate and a one-sided
    Fisher exact test (bucket vs all other rows) gives p < alpha / (number of buckets tested): weak
    slices are real, not noise, even with many properties and buckets.
    """
    wrong = np.asarray(wrong, dtype=bool)
    overall = wrong.mean() if len(wrong) else 0.0
    rows = []
    for name in properties.columns:
        values = properties[name].to_numpy()
        edges = np.unique(np.quantile(values, np.linspace(0, 1, n_buckets + 1)))
        if len(edges) < 2:
            continue  # constant: nothing to compare
        bucket = np.searchsorted(edges[1:-1], values, side="right")
        n_b = len(edges) - 1
        for b in range(n_b):
            inside = bucket == b
            n, e = int(inside.sum()), int(wrong[inside].sum())
            if n == 0:
                continue
            e_rest, n_rest = int(wrong.sum()) - e, len(wrong) - n
            p = fisher_exact([[e, n - e], [e_rest, n_rest - e_rest]], alternative="greater")[1] if n_rest else 1.0
            side = "low" if b < (n_b - 1) / 2 else "high" if b > (n_b - 1) / 2 else "middle"
            rows.append(
                {
                    "property": name,
                    "bucket": b,
                    "side": side,
                    "lo": float(values[inside].min()),
                    "hi": float(values[inside].max()),
                    "rows": n,
                    "errors": e,
                    "error_rate": e / n,
                    "ratio": (e / n) / overall if overall > 0 else 0.0,
                    "p_value": float(p),
                }
            )
    table = pd.DataFrame(
        rows, columns=["property", "bucket", "side", "lo", "hi", "rows", "errors", "error_rate", "ratio", "p_value"]
    )
    table["weak"] = (table["ratio"] >= min_ratio) & (table["p_value"] < alpha / max(len(table), 1))
    return table


@dataclass(frozen=True)
class Advice:
    weakness: str  # the images the model gets wrong, in words
    remedy: str  # the augmentation family
    augment: dict  # the train.augment entry that turns it on: {TransformName: {kwargs}}


ADVICE: dict[tuple[str, str], Advice] = {
    ("brightness", "low"): Advice(
        "dark images",
        "brightness augmentation",
        {"RandomBrightnessContrast": {"brightness_limit": 0.3, "contrast_limit": 0.0, "p": 0.5}},
    ),
    ("brightness", "high"): Advice(
        "bright, washed-out images",
        "brightness / gamma augmentation",
        {"RandomGamma": {"gamma_limit": [70, 150], "p": 0.5}},
    ),
    ("contrast", "low"): Advice(
        "low-contrast images",
        "contrast augmentation",
        {"RandomBrightnessContrast": {"brightness_limit": 0.0, "contrast_limit": 0.3, "p": 0.5}},
    ),
    ("contrast", "high"): Advice(
        "high-contrast images",
        "contrast augmentation",
        {"RandomBrightnessContrast": {"brightness_limit": 0.0, "contrast_limit": 0.3, "p": 0.5}},
    ),
    ("colourfulness", "low"): Advice(
        "grey, washed-out colours",
        "colour augmentation (saturation, greyscale)",
        {"HueSaturationValue": {"hue_shift_limit": 10, "sat_shift_limit": 40, "val_shift_limit": 0, "p": 0.5}},
    ),
    ("colourfulness", "high"): Advice(
        "strongly coloured images",
        "colour augmentation (hue, saturation)",
        {"HueSaturationValue": {"hue_shift_limit": 15, "sat_shift_limit": 30, "val_shift_limit": 0, "p": 0.5}},
    ),
    ("sharpness", "low"): Advice(
        "blurry images", "blur augmentation", {"GaussianBlur": {"blur_limit": [3, 5], "p": 0.3}}
    ),
    ("sharpness", "high"): Advice(
        "sharp, noisy or highly textured images",
        "noise augmentation",
        {"GaussNoise": {"std_range": [0.02, 0.1], "p": 0.3}},
    ),
    ("scale", "low"): Advice(
        "small, low-resolution originals",
        "resolution augmentation",
        {"Downscale": {"scale_range": [0.5, 0.9], "p": 0.3}},
    ),
    ("scale", "high"): Advice(
        "large originals, whose detail the resize shrinks",
        "scale (zoom) augmentation",
        {"Affine": {"scale": [0.7, 1.3], "p": 0.5}},
    ),
    ("aspect", "low"): Advice(
        "tall images, squashed by the square resize",
        "aspect-ratio augmentation",
        {"Affine": {"scale": {"x": [0.75, 1.33], "y": [1.0, 1.0]}, "p": 0.5}},
    ),
    ("aspect", "high"): Advice(
        "wide images, squashed by the square resize",
        "aspect-ratio augmentation",
        {"Affine": {"scale": {"x": [1.0, 1.0], "y": [0.75, 1.33]}, "p": 0.5}},
    ),
}


def augment_yaml(entry: dict) -> str:
    """One train.augment list item in params.yaml's flow style: `- Name: {k: v, ...}`."""
    ((name, kwargs),) = entry.items()

    def fmt(v):
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {fmt(x)}" for k, x in v.items()) + "}"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return str(v)

    return f"- {name}: {fmt(kwargs)}"


def advise(slices: pd.DataFrame, augment: list[dict] | None, where: str = "train.augment") -> list[dict]:
    """Plain-language advice per weak slice, worst first, with the augmentation entry that addresses it.

    `augment` is the model's current augmentation list (None for an ensemble of several); a transform
    already in it gets "make it stronger" instead of "add".
    """
    present = {next(iter(e)) for e in augment or []}
    out = []
    for row in slices[slices["weak"]].sort_values("ratio", ascending=False).itertuples():
        rule = ADVICE.get((row.property, row.side))
        text = (
            f"Errors are {row.ratio:.1f}x the overall rate on images with {row.property} in "
            f"[{row.lo:.3g}, {row.hi:.3g}] ({row.rows} rows, {row.error_rate:.1%} wrong, p={row.p_value:.2g})"
        )
        if rule is None:  # a middle bucket: no single augmentation addresses it
            out.append(
                {
                    "property": row.property,
                    "side": row.side,
                    "ratio": row.ratio,
                    "text": text + ".",
                    "augmentation": None,
                    "params": None,
                }
            )
            continue
        name = next(iter(rule.augment))
        if name in present:
            action = f"{where} already has {name}: widen its range or raise augment_p"
        else:
            action = f"add {rule.remedy}: append to {where} in params.yaml:  {augment_yaml(rule.augment)}"
        out.append(
            {
                "property": row.property,
                "side": row.side,
                "ratio": row.ratio,
                "text": f"{text}: the model struggles with {rule.weakness}. {action[0].upper()}{action[1:]}.",
                "augmentation": name,
                "params": augment_yaml(rule.augment),
            }
        )
    return out


# ---------------------------------------------------------------- models side by side


def diversity(oof: dict[str, np.ndarray], y: np.ndarray) -> pd.DataFrame:
    """Per pair of models: disagreement (share of rows with different predictions), correlation of their
    error indicators, share of rows both get wrong, and the accuracy of an oracle picking the right one."""
    names = list(oof)
    wrong = {m: oof[m].argmax(1) != y for m in names}
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            ea, eb = wrong[a].astype(float), wrong[b].astype(float)
            corr = float(np.corrcoef(ea, eb)[0, 1]) if ea.std() > 0 and eb.std() > 0 else float("nan")
            rows.append(
                {
                    "a": a,
                    "b": b,
                    "disagreement": float((oof[a].argmax(1) != oof[b].argmax(1)).mean()),
                    "error_correlation": corr,
                    "both_wrong": float((wrong[a] & wrong[b]).mean()),
                    "oracle_accuracy": float(1 - (wrong[a] & wrong[b]).mean()),
                }
            )
    return pd.DataFrame(rows, columns=["a", "b", "disagreement", "error_correlation", "both_wrong", "oracle_accuracy"])


def per_class_accuracy(oof: dict[str, np.ndarray], y: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Rows: classes; columns: models; values: recall (accuracy on that class's rows)."""
    return pd.DataFrame(
        {
            m: [
                float((p[y == c].argmax(1) == c).mean()) if (y == c).any() else float("nan")
                for c in range(len(classes))
            ]
            for m, p in oof.items()
        },
        index=classes,
    )


# ---------------------------------------------------------------- one model's analysis


@dataclass
class ModelAnalysis:
    name: str
    probs: np.ndarray
    scores: dict[str, float]
    folds: pd.DataFrame
    per_class: pd.DataFrame
    confusion: np.ndarray
    pairs: list[tuple[int, int, int]]
    worst: np.ndarray
    confident_wrong: np.ndarray
    reliability: pd.DataFrame
    ece: float
    slices: pd.DataFrame
    advice: list[dict] = field(default_factory=list)
    ensemble: bool = False  # the submission's ensemble rather than one backbone
    holdout: dict | None = None  # cv.holdout's scores (reports/ensemble.json): the bag as test is predicted

    # Backbones and the ensemble live in separate namespaces of the report (its anchors, folders and
    # JSON keys), so any backbone name works, "ensemble" and "models" included.
    @property
    def anchor(self) -> str:
        """The prefix of the model's HTML ids."""
        return "ensemble" if self.ensemble else f"backbone-{self.name}"

    @property
    def folder(self) -> Path:
        """Its folder under figures/ and tables/."""
        return Path("ensemble") if self.ensemble else Path("backbones") / self.name

    @property
    def label(self) -> str:
        """Its name in the report's tables."""
        return "ensemble (submission)" if self.ensemble else self.name


def analyze_model(
    name: str,
    probs: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    classes: list[str],
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
    """Everything the report shows for one model's OOF probabilities; its scores lead with `metric`
    (the competition's), in the report's tables and in `dvc metrics show`."""
    pred = probs.argmax(1)
    reliability = reliability_table(probs, y, calibration_bins)
    cm = confusion_counts(y, pred, len(classes))
    slices = slice_errors(pred != y, properties, slice_buckets, alpha)
    return ModelAnalysis(
        name=name,
        probs=probs,
        scores=scores(probs, y, dict.fromkeys([metric, *METRICS])),
        folds=fold_scores(probs, y, folds),
        per_class=per_class_scores(probs, y, classes),
        confusion=cm,
        pairs=most_confused_pairs(cm, pairs),
        worst=worst_rows(probs, y, top_k),
        confident_wrong=confident_wrong_rows(probs, y, top_k),
        reliability=reliability,
        ece=expected_calibration_error(reliability),
        slices=slices,
        ensemble=ensemble,
        advice=advise(slices, augment, where),
    )


def summary(analyses: list[ModelAnalysis], div: pd.DataFrame) -> dict:
    """Headline numbers for `dvc metrics show`: a block per backbone, the ensemble's, one per pair of backbones."""
    out = {"backbones": {}, "pairs": {}}
    for a in analyses:
        block = {
            **a.scores,
            "ece": a.ece,
            "fold_accuracy_mean": float(a.folds.loc["mean", "accuracy"]),
            "fold_accuracy_std": float(a.folds.loc["std", "accuracy"]),
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
    rows = (data.targets, data.folds, data.classes, properties)
    analyses = []
    for name, probs in oof.items():
        augment = resolve_train_settings(params.train, name).augment or default_augment(data.train_images.shape[1])
        where = f"train.backbones.{name}.augment" if params.train.backbones[name].augment else "train.augment"
        analyses.append(analyze_model(name, probs, *rows, augment, where=where, **kwargs))
    analyses.append(
        analyze_model("ensemble", ensemble_oof, *rows, None, where="train.augment", ensemble=True, **kwargs)
    )
    return analyses


def attach_holdout(analyses: list[ModelAnalysis], report: dict) -> None:
    """With `cv.holdout`, each model's scores on the held-out rows from the ensemble stage's report."""
    for a in analyses:
        a.holdout = report.get("holdout") if a.ensemble else report.get("backbones", {}).get(a.name, {}).get("holdout")


def headline_line(a: ModelAnalysis, metric: str) -> str:
    """One model's line in the stage's log: OOF scores, calibration, its first advice."""
    missing = never_predicted(a.per_class)
    shown = dict.fromkeys([metric, "accuracy"])
    return (
        f"{a.name}: OOF "
        + ", ".join(f"{m} {a.scores[m]:.4f}" for m in shown)
        + f", ECE {a.ece:.4f}, "
        + (f"holdout {metric} {a.holdout[metric]:.4f}, " if a.holdout else "")
        + f"{len(a.advice)} weak slice(s)"
        + (f"; {a.advice[0]['augmentation']}" if a.advice else "")
        + (f"; never predicts class {', '.join(missing[:5])} (try train.class_weight: balanced)" if missing else "")
    )
