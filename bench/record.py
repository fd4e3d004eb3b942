"""The record table of docs/results.md, read from the outputs of one `dvc repro` (run it in the repository root).

    python bench/record.py --started 2026-11-22T12:07:26

Per backbone: fold 0's accuracy and the OOF accuracy, each without TTA and with the TTA policy the
predict stage chose on OOF; each seed's OOF and the bag's; then the final ensemble's cross-fitted OOF.
Stage wall times come from when each stage's outputs were last written (DVC runs stages one after
another), the first measured from `--started`, the time `make run` was started.
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.data import load_prepared


def _acc(probs: np.ndarray, y: np.ndarray) -> float:
    return float((probs.argmax(1) == y).mean())


def stage_ends(backbones: list[str]) -> dict[str, float]:
    ends = {"prepare": max(p.stat().st_mtime for p in Path("data/prepared").iterdir())}
    for b in backbones:
        if Path(f"reports/tune/{b}.json").exists():
            ends[f"tune@{b}"] = Path(f"reports/tune/{b}.json").stat().st_mtime
        ends[f"train@{b}"] = Path(f"reports/train/{b}.json").stat().st_mtime
        ends[f"predict@{b}"] = Path(f"reports/predict/{b}.json").stat().st_mtime
    ends["ensemble"] = Path("reports/ensemble.json").stat().st_mtime
    ends["analyze"] = Path("reports/oof/summary.json").stat().st_mtime
    return dict(sorted(ends.items(), key=lambda kv: kv[1]))


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(round(seconds % 60)):02d} s"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--started", required=True, help="ISO time `make run` started, e.g. 2026-11-22T12:07:26")
    args = parser.parse_args()

    data = load_prepared("data/prepared", images=False)  # run from the repository root
    y, folds = data.train["target"].to_numpy(), data.train["fold"].to_numpy()
    ensemble = json.loads(Path("reports/ensemble.json").read_text())
    rows = []
    for b, info in ensemble["backbones"].items():
        train = json.loads(Path(f"reports/train/{b}.json").read_text())
        oof = pd.read_csv(f"predictions/{b}/oof_probs.csv", dtype={"id": str}).set_index("id")
        probs = oof.loc[data.train["id"], data.classes].to_numpy()
        seeds = info["seeds"]
        rows.append(
            f"| {b} | {train['folds']['0']['accuracy']:.4f} | {_acc(probs[folds == 0], y[folds == 0]):.4f} "
            f"| {info['oof_no_tta']['accuracy']:.4f} | {info['oof']['accuracy']:.4f} ({info['tta']}; cross-fitted "
            f"choice {info['oof_tta_selection_crossfit']['accuracy']:.4f}) | "
            + (
                " / ".join(f"seed {s} {m['accuracy']:.4f}" for s, m in seeds.items())
                + f", bag {info['oof']['accuracy']:.4f}"
                if len(seeds) > 1
                else f"one seed ({next(iter(seeds))})"
            )
            + " |"
        )
    method = ensemble["method"]
    print("| backbone | fold 0, no TTA | fold 0, TTA | OOF, no TTA | OOF, TTA | seeds |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    m = ensemble["methods"][method]
    print(
        f"\nEnsemble `{method}` (chosen on honest {ensemble['metric']}): cross-fitted OOF accuracy "
        f"{m['oof']['accuracy']:.4f}, log loss {m['oof']['log_loss']:.4f} "
        f"(in-sample {m['oof_in_sample']['accuracy']:.4f}); "
        f"best single backbone {ensemble['best_single']['backbone']} {ensemble['best_single']['accuracy']:.4f}."
    )
    ends = stage_ends(list(ensemble["backbones"]))
    previous = datetime.fromisoformat(args.started).timestamp()
    start = previous
    print("\n| stage | wall time |\n|---|---|")
    for stage, end in ends.items():
        print(f"| {stage} | {_minutes(end - previous)} |")
        previous = end
    print(f"| all (`make run` start to analyze written) | {_minutes(previous - start)} |")
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
        platform.machine(),
    )
    print(
        f"\nmachine: {cpu}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {'CUDA' if torch.cuda.is_available() else 'no GPU'}"
    )


if __name__ == "__main__":
    main()
