"""A multi-label competition built from the CIFAR-10 zip's training images, for docs/multilabel.md.

    python bench/multilabel_cifar.py data/raw/cifar10.zip data/raw/cifar10-tags

Each image is a 64x64 mosaic of 2x2 CIFAR-10 images (a quarter of the tiles blank, never all four), tagged
with the distinct classes it shows, space-separated (Planet's layout): train.csv `id,tags`,
sample_submission.csv, and solution.csv with the test tags (a local leaderboard; never used to choose).
Training mosaics use the first 40,000 training images, test mosaics the other 10,000, so no tile is on both
sides. Scored by F2 over images (Planet's metric) in the docs' run.
"""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def build(zip_path: Path, out: Path, n_train: int = 9000, n_test: int = 1000, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(zip_path) as z:
        labels = pd.read_csv(io.BytesIO(z.read("train.csv")), dtype={"id": str})
        names = {Path(n).stem: n for n in z.namelist() if n.startswith("train/") and not n.endswith("/")}

        def tile(i: int) -> np.ndarray:
            return np.asarray(Image.open(io.BytesIO(z.read(names[labels["id"][i]]))).convert("RGB"))

        pools = {"train": np.arange(0, 40000), "test": np.arange(40000, len(labels))}
        for split, n in (("train", n_train), ("test", n_test)):
            (out / split).mkdir(parents=True, exist_ok=True)
            rows = []
            for k in range(n):
                shown = rng.random(4) >= 0.25
                shown[rng.integers(4)] = True
                picks = rng.choice(pools[split], 4, replace=False)
                img = np.zeros((64, 64, 3), dtype=np.uint8)
                for t in np.flatnonzero(shown):
                    r, c = divmod(t, 2)
                    img[32 * r : 32 * r + 32, 32 * c : 32 * c + 32] = tile(picks[t])
                image_id = f"{split}_{k:05d}"
                Image.fromarray(img).save(out / split / f"{image_id}.png")
                rows.append((image_id, " ".join(sorted({labels["label"][picks[t]] for t in np.flatnonzero(shown)}))))
            table = pd.DataFrame(rows, columns=["id", "tags"])
            if split == "train":
                table.to_csv(out / "train.csv", index=False)
            else:
                table.to_csv(out / "solution.csv", index=False)
                table.assign(tags="cat").to_csv(out / "sample_submission.csv", index=False)


if __name__ == "__main__":
    build(Path(sys.argv[1]), Path(sys.argv[2]))
