"""`init`: the preset of one's own photo competition, written from what its files hold.

    python -m pipeline init data/raw/my-comp.zip --budget 20   # -> configs/presets/my-comp.yaml
    make run PRESET=my-comp                                    # apply it, convert the weights, `dvc repro`

It reads the competition as prepare does (`prepare.read_train`: a train.csv or class folders, the kind of
target) after finding its layout: the train CSV and the sample submission, the id and label columns (the
sample submission's, Kaggle's convention), the image folders and extension. From a sample of the training
images' headers it takes their sizes, and writes a commented preset: ImageNet EfficientNet-Lite backbones
(offline weights, converted by `preset`), each at its weights' input size capped at the images' median
native side, the cache just above it, a letterbox where aspect ratios are mixed, a holdout where the set is
large enough, as many backbones as the budget trains well, the regime left to the plan (`finetune: auto`), TTA
and the ensemble chosen on OOF. Lines marked `SET` are the competition's: check them (the metric above all).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import io
import math
import posixpath
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from pipeline.competition import CompetitionFiles, ImageFolder
from pipeline.config import CompetitionConfig, parse_params
from pipeline.errors import PipelineError
from pipeline.io import atomic_write_text
from pipeline.presets import PRESETS
from pipeline.targets import read_train
from pipeline.tasks import TASKS, Task

# The backbones, in the order they join: (timm model, its training cost per image at one input size relative
# to Lite0's: the FLOPs ratio at 96 px, 141 : 184 : 211 MFLOPs; the plan measures the real speeds).
BACKBONES = (("tf_efficientnet_lite0", 1.0), ("tf_efficientnet_lite1", 1.3), ("tf_efficientnet_lite2", 1.5))
LITE0_TRAIN_IMAGES_PER_S = 98.0  # at 96 px, bf16, 2-core AMD EPYC (docs/results.md, photo-cpu): init's estimate
MIN_EPOCHS = 6  # a backbone joins the ensemble when the budget's half trains every fold model this many epochs
MIN_INPUT = 64  # below this a stride-32 network has under 2x2 features: small images are upsampled to it
HOLDOUT_ROWS, HOLDOUT_CLASS_ROWS = 1000, 50  # a 10% holdout with at least this many rows (and of each class)
SAMPLED_IMAGES = 200  # image headers read for the sizes
DEFAULT_METRIC = {"single_label": "accuracy", "multilabel": "micro_f1", "regression": "rmse"}


# ---------------------------------------------------------------- the layout


def _has_images(files: CompetitionFiles, folder: str) -> bool:
    try:
        return bool(files.images_under(folder))
    except PipelineError:
        return False


def _pick(names: list[str], preferred: str, word: str) -> str | None:
    """`preferred` if it is among `names`, else the one name holding `word`, else None."""
    if preferred in names:
        return preferred
    matches = [n for n in names if word in n.lower()]
    return matches[0] if len(matches) == 1 else None


def _label_column(columns: list[str], id_column: str, sample_columns: list[str]) -> str | list[str]:
    """The sample submission's answer column when train.csv has it, else `label`, else the one other
    column; one 0/1 column per label when the sample's columns after the id are all train.csv's."""
    others = [c for c in columns if c != id_column]
    answers = [c for c in sample_columns[1:] if c in others]
    if len(sample_columns) == 2 and answers:
        return answers[0]
    if len(answers) > 1 and len(answers) == len(sample_columns) - 1:
        return answers
    if "label" in others:
        return "label"
    if len(others) == 1:
        return others[0]
    raise PipelineError(
        f"init: cannot tell the label column among {others} (no sample submission names it): pass --label-column"
    )


def find_layout(source: str, label_column: str | None = None) -> CompetitionConfig:
    """competition.* of the competition at `source` (a folder or a .zip): its train CSV or class folders,
    sample submission, id and label columns, image folders and extension."""
    files = CompetitionFiles(source)
    files.set_root("train.csv")
    if not files.exists("train.csv"):
        files.set_root("train/")
    csvs = [n for n in files.top_files() if n.lower().endswith(".csv")]
    train_csv = _pick(csvs, "train.csv", "train")
    sample_csv = _pick(csvs, "sample_submission.csv", "sample")
    folders = ["train", "train_images", "images", ""]
    comp = CompetitionConfig(source=source, train_csv=train_csv, sample_submission=sample_csv)
    sample_columns = list(files.read_csv(sample_csv).columns) if sample_csv else []
    if train_csv is None:
        train_dir = next((d for d in folders[:3] if _has_images(files, d)), None)
        if train_dir is None:
            raise PipelineError(f"{source}: no train CSV and no train/ folder of class folders")
        found = ImageFolder(files, train_dir, "").paths
        comp = _with(comp, train_dir=train_dir)
    else:
        columns = list(files.read_csv(train_csv).columns)
        id_column = sample_columns[0] if sample_columns[:1] and sample_columns[0] in columns else columns[0]
        label = label_column or _label_column(columns, id_column, sample_columns)
        ids = files.read_csv(train_csv)[id_column].head(50).tolist()
        train_dir, found = None, set()
        for folder in [d for d in folders if _has_images(files, d)]:
            images = ImageFolder(files, folder, "")
            hits = [images.find(i, train_csv) for i in ids]
            if sum(h is not None for h in hits) >= 0.9 * len(ids):
                train_dir, found = folder, {h for h in hits if h}
                break
        if train_dir is None:
            raise PipelineError(f"{files.where(train_csv)}: its first ids match no image in {folders[:3]} or the top")
        comp = _with(comp, id_column=id_column, label_column=label, train_dir=train_dir)
    exts = [posixpath.splitext(p)[1] for p in found]
    ext = max(set(exts), key=exts.count) if exts else ".jpg"
    test_dir = next((d for d in ("test", "test_images") if _has_images(files, d)), None)
    if test_dir is None:
        raise PipelineError(f"{source}: no test/ (or test_images/) folder of images")
    return _with(comp, image_ext=ext, test_dir=test_dir)


def _with(comp: CompetitionConfig, **changes) -> CompetitionConfig:
    return dataclasses.replace(comp, **changes)


def image_sizes(files: CompetitionFiles, paths: list[str]) -> np.ndarray:
    """(width, height) of up to SAMPLED_IMAGES of `paths`, evenly spaced, from the files' headers."""
    picked = [paths[i] for i in np.unique(np.linspace(0, len(paths) - 1, SAMPLED_IMAGES).astype(int))]
    sizes = []
    for p in picked:
        try:
            with Image.open(io.BytesIO(files.read(p))) as img:
                sizes.append(img.size)
        except OSError:
            continue  # an unreadable image is prepare's to name
    if not sizes:
        raise PipelineError(f"{files.where(picked[0])}: no readable training image among {len(picked)} sampled")
    return np.asarray(sizes, dtype=float)


# ---------------------------------------------------------------- the choices


def geometry(sizes: np.ndarray) -> dict:
    """The cache's resize mode and the images' native side: a letterbox (`pad`, side = the long one) when
    aspect ratios vary by more than 10% between the 10th and 90th percentile, else `squash` (side = the
    short one: a shared distortion costs nothing)."""
    short, long = sizes.min(1), sizes.max(1)
    ratio = long / short
    mixed = bool(np.quantile(ratio, 0.9) / np.quantile(ratio, 0.1) > 1.1)
    side = float(np.median(long if mixed else short))
    return {
        "resize": "pad" if mixed else "squash",
        "native": int(side),
        "median_w": int(np.median(sizes[:, 0])),
        "median_h": int(np.median(sizes[:, 1])),
        "mixed": mixed,
    }


def input_size(weights_size: int, native: int) -> int:
    """The network input: the weights' own size, capped at the native side (rounded down to a multiple of
    32 when capped), at least MIN_INPUT."""
    if native >= weights_size:
        return weights_size
    return max(MIN_INPUT, native // 32 * 32)


def members(inputs: dict[str, int], costs: dict[str, float], fit_rows: int, n_folds: int, budget: float | None):
    """The backbones to train, in BACKBONES order: all with no budget, else as many as train every fold
    model MIN_EPOCHS epochs in half the budget at init's speed estimate (at least one)."""
    if budget is None:
        return list(inputs)
    chosen, spent = [], 0.0
    for b in inputs:
        per_image = costs[b] * (inputs[b] / 96) ** 2 / LITE0_TRAIN_IMAGES_PER_S
        seconds = MIN_EPOCHS * (n_folds - 1) * fit_rows * per_image
        if chosen and spent + seconds > budget * 60 / 2:
            break
        chosen.append(b)
        spent += seconds
    return chosen


def holdout_share(n_rows: int, counts: np.ndarray | None) -> float | None:
    """0.1 when the set has HOLDOUT_ROWS rows and its smallest class HOLDOUT_CLASS_ROWS, else None."""
    if n_rows < HOLDOUT_ROWS or (counts is not None and len(counts) and counts.min() < HOLDOUT_CLASS_ROWS):
        return None
    return 0.1


@dataclasses.dataclass(frozen=True)
class Survey:
    """What init found in a competition: its layout, rows, kind of target, class counts, image geometry."""

    comp: CompetitionConfig
    rows: int
    task: Task
    counts: np.ndarray | None  # rows per class (single-label), else None
    geo: dict  # `geometry` of the sampled images
    sampled: int


def survey(source: str, label_column: str | None = None) -> Survey:
    """The competition at `source` read as prepare reads it, and a sample of its images' sizes."""
    comp = find_layout(source, label_column)
    files = CompetitionFiles(source)
    files.set_root(comp.train_csv or comp.train_dir + "/")
    train, task = read_train(files, comp)
    paths = train["path"].dropna().tolist()
    counts = np.asarray(train["label"].value_counts().to_numpy()) if task.name == "single_label" else None
    return Survey(comp, len(train), task, counts, geometry(image_sizes(files, paths)), min(len(paths), SAMPLED_IMAGES))


def _augment(size: int) -> list:
    return [{"RandomResizedCrop": {"size": [size, size], "scale": [0.35, 1.0]}}, {"HorizontalFlip": {"p": 0.5}}]


def photo_preset(found: Survey, budget: float | None, metric: str | None) -> dict:
    """The preset's keys for the surveyed competition (the rules in the module docstring and README)."""
    import timm

    comp, task, native = found.comp, found.task, found.geo["native"]
    holdout = holdout_share(found.rows, found.counts)
    n_folds = 3 if budget is not None and budget < 60 else 5
    inputs = {m: input_size(timm.models.get_pretrained_cfg(m).input_size[-1], native) for m, _ in BACKBONES}
    chosen = members(inputs, dict(BACKBONES), int(found.rows * (1 - (holdout or 0))), n_folds, budget)
    inputs = {b: inputs[b] for b in chosen}
    largest, shared = max(inputs.values()), len(set(inputs.values())) == 1
    backbones = {b: {"pretrained": f"weights/{b}"} for b in chosen}
    if not shared:  # each its own input, and augmentation ending there
        for b, size in inputs.items():
            backbones[b].update(image_size=size, augment=_augment(size))
    competition = {k: getattr(comp, k) for k in ("source", "train_csv", "train_dir", "test_dir", "image_ext")}
    if comp.train_csv:
        competition.update(id_column=comp.id_column, label_column=comp.label_column)
    competition.update(sample_submission=comp.sample_submission, metric=metric or DEFAULT_METRIC[task.name])
    methods = [m for m in ("soft_voting", "caruana", "optimized", "stacking") if m in TASKS[task.name].ENSEMBLE_METHODS]
    train = {"backbones": backbones, **({"image_size": largest, "augment": _augment(largest)} if shared else {})}
    train.update(
        epochs=10,
        val_every=100,
        batch_size=32 if largest > 192 else 64,
        lr=0.001,
        warmup_epochs=0.5,
        label_smoothing=0.1 if task.name == "single_label" else 0.0,
        precision="auto",
        finetune="auto",
    )
    preset = {
        "competition": competition,
        "prepare": {"image_size": max(largest, min(native, math.ceil(largest / 0.875))), "resize": found.geo["resize"]},
        "cv": {"n_folds": n_folds, "holdout": holdout},
        "train": train,
        "tta": {"candidates": ["none", "hflip"], "metric": None},
        "ensemble": {"method": "auto", "methods": methods if len(chosen) > 1 else ["soft_voting"]},
        "budget": {"minutes": budget, "probe_batches": 40},
    }
    parse_params(preset, source="init")  # every key exists and has the right type
    return preset


def _comments(found: Survey, preset: dict) -> dict[str, str]:
    """Each written key's inline comment: why init chose its value, or SET where the user must check it."""
    task, geo, budget = found.task, found.geo, preset["budget"]["minutes"]
    side = "long" if geo["mixed"] else "short"
    chosen = len(preset["train"]["backbones"])
    comments = {
        "competition.source": "SET: where the competition's zip or folder is",
        "competition.metric": f"SET: the competition's metric ({task.name}: {', '.join(task.METRICS)})",
        "competition.label_column": "SET: the sample submission's answer column, found in train.csv",
        "prepare.image_size": "the cache: the largest input, up to its crop room (/0.875), at most the native side",
        "prepare.resize": "aspect ratios vary: letterboxed" if geo["mixed"] else "aspect ratios alike: resized whole",
        "cv.holdout": "scored like the test set"
        if preset["cv"]["holdout"]
        else f"under {HOLDOUT_ROWS} rows or a class under {HOLDOUT_CLASS_ROWS}: no holdout",
        "train.backbones": f"{chosen} of {len(BACKBONES)} ImageNet Lites: what half the budget trains "
        f"{MIN_EPOCHS} epochs per fold model"
        if budget
        else "the three ImageNet Lites",
        "train.image_size": f"the weights' input, capped at the images' median {side} side ({geo['native']} px)",
        "train.epochs": "scaled by the plan to fill budget.minutes",
        "train.val_every": "the last epoch is kept (no validation cost)",
        "train.label_smoothing": "the report says whether the model ends under-confident",
        "train.finetune": "the plan picks features+sklearn or full: measured where the budget allows, else its rule",
        "tta.candidates": "chosen per backbone on OOF",
        "budget.minutes": "the whole `dvc repro`; null: the epochs above",
    }
    if "image_size" not in preset["train"]:
        comments["train.backbones"] += f"; each at its weights' input, capped at the images' median {side} side"
    return comments


def _header(found: Survey, source: str) -> list[str]:
    comp, task, geo, counts = found.comp, found.task, found.geo, found.counts
    classes = f"{len(counts)} classes, {int(counts.min())}-{int(counts.max())} rows each" if counts is not None else ""
    layout = f"train CSV {comp.train_csv}" if comp.train_csv else f"class folders under {comp.train_dir}/"
    return [
        f"written by `python -m pipeline init {source}` on {dt.date.today().isoformat()} from what it holds:",
        f"{layout}, {found.rows} training rows ({task.name}: {classes or task.describe()}), images in "
        f"{comp.train_dir}/ and {comp.test_dir}/ ({comp.image_ext}),",
        f"median {geo['median_w']}x{geo['median_h']} px of {found.sampled} sampled"
        f"{', mixed aspect ratios' if geo['mixed'] else ''}. Check the lines marked SET, then",
        "`make run PRESET=<this file>` (or `python -m pipeline preset <this file>` and `dvc repro`). Online,",
        "`pretrained: true` takes timm's copy of the same weights; offline, `preset` converts them.",
    ]


def make_template(source: str, budget: float | None, metric: str | None, label_column: str | None = None):
    """(the preset as a mapping, {dotted key: its comment}, the header's lines)."""
    found = survey(source, label_column)
    preset = photo_preset(found, budget, metric)
    return preset, _comments(found, preset), _header(found, source)


# ---------------------------------------------------------------- writing it


def _flow(value) -> str:
    return (
        yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip().removesuffix("...").strip()
    )


def to_yaml(preset: dict, comments: dict, header: list[str]) -> str:
    """The preset as YAML, each key's comment inline."""
    lines = [f"# {h}".rstrip() for h in header]

    def walk(d: dict, path: str, indent: int) -> None:
        for k, v in d.items():
            key = f"{path}{k}"
            note = f"  # {comments[key]}" if key in comments else ""
            pad = " " * indent
            if isinstance(v, dict) and v:
                lines.append(f"{pad}{k}:{note}")
                walk(v, key + ".", indent + 2)
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                lines.append(f"{pad}{k}:{note}")
                lines.extend(f"{pad}  - {_flow(x)}" for x in v)
            else:
                lines.append(f"{pad}{k}: {_flow(v)}{note}")

    walk(preset, "", 0)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline init", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="the competition: a folder or a .zip (e.g. data/raw/my-comp.zip)")
    parser.add_argument("--out", help="the preset file to write (default: configs/presets/<source's name>.yaml)")
    parser.add_argument("--budget", type=float, default=60.0, help="budget.minutes (default 60; 0: no budget)")
    parser.add_argument("--metric", help="competition.metric (default: accuracy, micro_f1 or rmse by target)")
    parser.add_argument("--label-column", help="train.csv's label column, where init cannot tell it")
    parser.add_argument("--force", action="store_true", help="overwrite --out")
    args = parser.parse_args(argv)
    name = Path(args.source.rstrip("/")).name.removesuffix(".zip")
    out = Path(args.out) if args.out else PRESETS / f"{name}.yaml"
    if out.exists() and not args.force:
        raise PipelineError(f"{out}: exists (--force overwrites it)")
    preset, comments, header = make_template(args.source, args.budget or None, args.metric, args.label_column)
    atomic_write_text(out, to_yaml(preset, comments, [f"{out.stem}: {header[0]}", *header[1:]]))
    backbones = ", ".join(preset["train"]["backbones"])
    print(f"wrote {out}: {backbones}; next: make run PRESET={out if args.out else out.stem}")
    return 0
