"""Benchmark: prepare's time and peak memory on large photos, and training's memory reading them.

    python bench/large_images.py data/raw/cifar10.zip --n 10000 --size 384 --work /tmp/large

Builds (once, in --work) a competition of `--n` training and `--n // 10` test JPEGs of mixed sizes
(320-512 px a side, mixed aspect ratios; CIFAR-10 images upscaled, so sizes and decode costs are
those of a real photo competition, not its content), then in a fresh process runs `prepare` at
`--size` px and reports wall time and peak resident memory (the stage's process and its largest
decoding worker). Then one pass of training's data path (Dataset + DataLoader over a fold's rows of
the memory-mapped cache, default augmentation) reports the anonymous memory it needed.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def _write(job) -> None:
    source, names, out, seed = job
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(source) as z:
        for name, target in names:
            img = Image.open(io.BytesIO(z.read(name))).convert("RGB")
            w, h = rng.integers(320, 513, size=2)
            img.resize((int(w), int(h)), Image.BICUBIC).save(out / target, quality=90)


def build(source: str, work: Path, n: int) -> Path:
    comp = work / f"comp{n}"
    if (comp / "sample_submission.csv").exists():
        return comp
    (comp / "train").mkdir(parents=True, exist_ok=True)
    (comp / "test").mkdir(exist_ok=True)
    with zipfile.ZipFile(source) as z:
        labels = pd.read_csv(io.BytesIO(z.read(next(m for m in z.namelist() if m.endswith("train.csv")))), dtype=str)
        prefix = next(m for m in z.namelist() if m.endswith("train.csv"))[: -len("train.csv")]
    n_test = n // 10
    rows = labels.iloc[: n + n_test]
    names = [(f"{prefix}train/{i}.jpg", f"train/{i}.jpg") for i in rows["id"][:n]]
    names += [(f"{prefix}train/{i}.jpg", f"test/{i}.jpg") for i in rows["id"][n:]]
    jobs = [(source, names[k :: os.cpu_count()], comp, k) for k in range(os.cpu_count())]
    with mp.Pool(os.cpu_count()) as pool:
        pool.map(_write, jobs)
    rows.iloc[:n].to_csv(comp / "train.csv", index=False)
    rows.iloc[n:].assign(label=rows["label"].iloc[0])[["id", "label"]].to_csv(
        comp / "sample_submission.csv", index=False
    )
    return comp


PREPARE = """
import json, resource, time, sys
from pipeline.config import CompetitionConfig
from pipeline.prepare import prepare
start = time.perf_counter()
summary = prepare(CompetitionConfig(source=sys.argv[1], answers=None), int(sys.argv[2]), 5, 42, sys.argv[3], workers=0)
print(json.dumps({"seconds": time.perf_counter() - start, "images": summary["n_train"] + summary["n_test"],
                  "self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""

TRAIN_READ = """
import json, resource, sys, time
import numpy as np, torch
from pipeline.data import ImageDataset, Rows, build_loader, build_train_transform, load_prepared

def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) / 1024

data = load_prepared(sys.argv[1])
rows = np.flatnonzero(data.train["fold"].to_numpy() != 0)
images = Rows(data.train_images, rows)
dataset = ImageDataset(images, data.train["target"].to_numpy()[rows],
                       build_train_transform(None, 0, cache_size=images.shape[1]))
loader = build_loader(dataset, 64, True, 0, 0, torch.device("cpu"))
before, peak_anon, start = status("RssAnon"), 0.0, time.perf_counter()
for i, (x, y) in enumerate(loader):
    peak_anon = max(peak_anon, status("RssAnon"))
print(json.dumps({"fold_rows": len(rows), "seconds": time.perf_counter() - start, "anon_mib_before": before,
                  "anon_mib_peak": peak_anon, "rss_file_mib_end": status("RssFile"),
                  "fold_copy_mib": len(rows) * int(np.prod(images.shape[1:])) / 2**20}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--work", default="/tmp/large")
    args = parser.parse_args()
    work = Path(args.work)
    comp = build(args.source, work, args.n)
    out = work / f"prepared{args.n}_{args.size}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    prep = json.loads(
        subprocess.run(
            [sys.executable, "-c", PREPARE, str(comp), str(args.size), str(out)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    cache_gib = sum(f.stat().st_size for f in out.glob("*.npy")) / 2**30
    print(
        f"prepare {prep['images']} images at {args.size} px: {prep['seconds']:.0f} s "
        f"({prep['images'] / prep['seconds']:.0f} images/s), cache {cache_gib:.2f} GiB on disk, "
        f"peak RSS {prep['self_mib']:.0f} MiB (stage) / {prep['worker_mib']:.0f} MiB (largest decoding worker)"
    )
    read = json.loads(
        subprocess.run(
            [sys.executable, "-c", TRAIN_READ, str(out)], env=env, check=True, capture_output=True, text=True
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    print(
        f"one epoch of a fold's {read['fold_rows']} training images through the DataLoader: {read['seconds']:.0f} s, "
        f"anonymous memory {read['anon_mib_before']:.0f} -> peak {read['anon_mib_peak']:.0f} MiB "
        f"(a copy of the fold would be {read['fold_copy_mib']:.0f} MiB); page cache mapped at the end "
        f"{read['rss_file_mib_end']:.0f} MiB (reclaimable)"
    )


if __name__ == "__main__":
    main()
