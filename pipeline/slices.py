"""Error rates by image property (brightness, contrast, colour, sharpness, scale, aspect) and the
augmentation that addresses a weak slice, as a `train.augment` entry: the analyze stage's advice."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import fisher_exact

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
