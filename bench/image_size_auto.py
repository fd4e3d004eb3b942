"""Benchmark: `train.image_size: auto`'s rule against each of its candidate sides, on real photos, at a few budgets.

    python -m pipeline weights tf_efficientnet_lite0
    python bench/image_size_auto.py data/raw/signdigits.zip [--minutes 5 10] [--work /tmp/image_size_auto]
    python bench/image_size_auto.py data/raw/cifar10.zip --rows 10000 --fixed --minutes 30   # auto alone

bench/finetune_auto.py's arm (the photo-cpu preset's recipe, EfficientNet-Lite0 from ImageNet weights, full
fine-tuning, every row of the zip, `cv.holdout: 0.1` scored and choosing nothing, 3 folds), with the cache at
96 px: each budget runs the whole pipeline once with `image_size: auto` (the plan probes the largest and the
smallest candidate and picks one: reports/plan.json) and once at each other candidate side, fixed, so every
side is scored under the same budget with the epochs its own plan gives it (`--fixed`: these sides instead, e.g.
the cache's 96 px for CIFAR-10's 32 px photos, which the candidates stop at; `--rows`: a stratified share of
the training rows, as the preset's max_train_rows). Prints each arm's side, epochs,
OOF and holdout accuracy and seconds, then

    RESULT image_size_auto minutes <m> auto <side> holdout <side>:<acc> ... oof <side>:<acc> ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from airbench_peer import ROOT, run_pipeline  # bench/, beside this script
from finetune_auto import MODEL, arm_params, recorded

from pipeline.backbone import Backbone
from pipeline.config import parse_params, resolve_train_settings
from pipeline.data import load_prepared
from pipeline.plan import side_candidates
from pipeline.presets import merge


def candidates(run: Path, raw: dict) -> list[int]:
    """`image_size: auto`'s candidate sides for the run's prepared data, largest first."""
    params = parse_params(raw)
    settings = resolve_train_settings(params.train, MODEL)
    auto = Backbone(MODEL, MODEL, params.train.backbones[MODEL].pretrained, settings, 96, {})
    return side_candidates(load_prepared(run / "data/prepared"), auto)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("--minutes", type=float, nargs="+", default=[5, 10])
    parser.add_argument("--work", default="/tmp/image_size_auto")
    parser.add_argument("--fixed", type=int, nargs="*", help="the fixed sides to run (default: the other candidates)")
    parser.add_argument("--rows", type=int, help="competition.max_train_rows (default: every row)")
    args = parser.parse_args()
    source, work = str(Path(args.source).resolve()), Path(args.work)
    if not (ROOT / "weights" / MODEL).exists():
        raise SystemExit(f"weights/{MODEL}: not found; run python -m pipeline weights {MODEL} first")
    rows = {"competition": {"max_train_rows": args.rows}} if args.rows else {}
    for minutes in args.minutes:
        run = work / f"auto-{minutes:g}"
        raw = merge(arm_params(source, "full", minutes), {"train": {"image_size": "auto"}, **rows})
        arms = {"auto": recorded(run, run_pipeline(run, raw, [MODEL]))}
        plan = json.loads((run / "reports/plan.json").read_text())["backbones"][MODEL]
        chosen, sides = plan["image_size"], candidates(run, raw)
        print(f"auto at {minutes:g} min: {chosen} px", json.dumps(arms["auto"]), plan["image_size_reason"], flush=True)
        scores = {chosen: arms["auto"]}
        for side in args.fixed if args.fixed is not None else [s for s in sides if s != chosen]:
            run = work / f"{side}px-{minutes:g}"
            raw = merge(arm_params(source, "full", minutes), {"train": {"image_size": side}, **rows})
            scores[side] = recorded(run, run_pipeline(run, raw, [MODEL]))
            print(f"{side} px at {minutes:g} min", json.dumps(scores[side]), flush=True)
        line = lambda part: " ".join(f"{s}:{scores[s][part]['accuracy']:.4f}" for s in sorted(scores))  # noqa: E731
        print(f"RESULT image_size_auto minutes {minutes:g} auto {chosen} holdout {line('holdout')} oof {line('oof')}")


if __name__ == "__main__":
    main()
