"""Benchmark: `train.finetune: auto`'s rule against both of its regimes, on real photos, at a few budgets.

    python -m pipeline weights tf_efficientnet_lite0
    python bench/finetune_auto.py data/raw/signdigits.zip [--minutes 10 20] [--work /tmp/finetune_auto]
        [--arms features full auto]

The photo-cpu preset's recipe (EfficientNet-Lite0 from Google's ImageNet weights at 96 px, batch 64, AdamW
lr 1e-3, random resized crop and mirror, `hflip` TTA chosen on OOF) on the zip, every row of it,
`cv.holdout: 0.1` (scored, choosing nothing), 3 folds. Each budget: the whole pipeline (every stage
`dvc repro` runs, bench/airbench_peer.py's `run_pipeline`) with `finetune: full`; `features+sklearn` once
(one fit per fold, nothing the budget changes). What `auto` picks at a budget is `choose_finetune` on the
full run's plan: the plan auto makes first. Prints each arm's OOF and holdout accuracy and seconds, then

    RESULT finetune_auto minutes <m> auto <regime> full_holdout <acc> features_holdout <acc>

The `auto` arm runs the whole pipeline with `finetune: auto` at each budget, where the plan measures both regimes
on an inner split of fold 0's training rows if the budget allows (`plan.compare_regimes`), and prints

    RESULT finetune_auto_measured minutes <m> chosen <regime> full <score> features <score> oof <acc> holdout <acc>
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from airbench_peer import ROOT, run_pipeline  # bench/, beside this script

from pipeline.backbone import Backbone
from pipeline.config import parse_params, resolve_train_settings
from pipeline.data import load_prepared
from pipeline.plan import choose_finetune
from pipeline.presets import load_preset, merge

MODEL = "tf_efficientnet_lite0"


def arm_params(source: str, finetune: str, minutes: float | None) -> dict:
    raw = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), load_preset("photo-cpu", ROOT / "configs/presets"))
    raw["competition"] = {"source": source}  # every row: the preset's max_train_rows is for CIFAR
    weights = str(ROOT / "weights" / MODEL)
    changes = {
        "cv": {"n_folds": 3, "holdout": 0.1},
        "train": {"finetune": finetune, "backbones": {MODEL: {"pretrained": weights}}},
        "budget": {"minutes": minutes},
        "tracking": {"enabled": False},
    }
    return merge(raw, changes)


def recorded(work: Path, seconds: dict) -> dict:
    report = json.loads((work / "reports/ensemble.json").read_text())
    plan = json.loads((work / "reports/plan.json").read_text())["backbones"][MODEL]
    return {"oof": report["oof"], "holdout": report["holdout"], "epochs": plan.get("epochs"), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("--minutes", type=float, nargs="+", default=[10, 20])
    parser.add_argument("--work", default="/tmp/finetune_auto")
    parser.add_argument("--arms", nargs="+", default=["features", "full"], choices=["features", "full", "auto"])
    args = parser.parse_args()
    source, work = str(Path(args.source).resolve()), Path(args.work)
    if not (ROOT / "weights" / MODEL).exists():
        raise SystemExit(f"weights/{MODEL}: not found; run python -m pipeline weights {MODEL} first")
    if "auto" in args.arms:
        for minutes in args.minutes:
            measured_arm(source, work / f"auto-{minutes:g}", minutes)
    if "features" in args.arms:
        features = run_pipeline(work / "features", arm_params(source, "features+sklearn", None), [MODEL])
        print("features+sklearn", json.dumps(recorded(work / "features", features)), flush=True)
    if "full" in args.arms:
        for minutes in args.minutes:
            full_arm(source, work, minutes, "features" in args.arms)


def measured_arm(source: str, run: Path, minutes: float) -> None:
    """The whole pipeline with `finetune: auto`: the plan's measured choice, where the budget allows it."""
    arm = recorded(run, run_pipeline(run, arm_params(source, "auto", minutes), [MODEL]))
    plan = json.loads((run / "reports/plan.json").read_text())["backbones"][MODEL]
    print(f"auto at {minutes:g} min", json.dumps(arm), "| plan:", json.dumps(plan), flush=True)
    c = plan.get("finetune_comparison", {})
    print(
        f"RESULT finetune_auto_measured minutes {minutes:g} chosen {plan['finetune']} full {c.get('full')} "
        f"features {c.get('features+sklearn')} oof {arm['oof']['accuracy']:.4f} "
        f"holdout {arm['holdout']['accuracy']:.4f}"
    )


def full_arm(source: str, work: Path, minutes: float, with_features: bool) -> None:
    """The whole pipeline with `finetune: full`, and the rule's choice on its plan."""
    run = work / f"full-{minutes:g}"
    raw = arm_params(source, "full", minutes)
    full = recorded(run, run_pipeline(run, raw, [MODEL]))
    params = parse_params({**raw, "train": {**raw["train"], "finetune": "auto"}})
    settings = resolve_train_settings(params.train, MODEL)
    auto = Backbone(MODEL, MODEL, params.train.backbones[MODEL].pretrained, settings, 96, {})
    choice = choose_finetune(load_prepared(run / "data/prepared", images=False), auto, full["epochs"])
    print(f"full at {minutes:g} min", json.dumps(full), "| auto:", json.dumps(choice), flush=True)
    if with_features:
        features = json.loads((work / "features/reports/ensemble.json").read_text())["holdout"]["accuracy"]
        print(
            f"RESULT finetune_auto minutes {minutes:g} auto {choice['finetune']} "
            f"full_holdout {full['holdout']['accuracy']:.4f} features_holdout {features:.4f}"
        )


if __name__ == "__main__":
    main()
