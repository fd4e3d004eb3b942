"""Label balance of multi-label folds with groups kept whole (docs/multilabel.md).

    python bench/multilabel_folds.py

2,000 images in groups of 4 (a patient's images: half of each image's labels shared with its group), 12 labels
from 1% to 30% prevalent, 5 folds: the pipeline's rule (iterative stratification over groups, each group one
item with the union of its rows' labels) against scikit-learn's shuffled GroupKFold. Printed: the largest gap
between a fold's share of a label's positives and 1/5, and how many (fold, label) cells have no positive.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import GroupKFold

from pipeline.tasks.multilabel import MultiLabel


def balance(y: np.ndarray, splits, k: int) -> tuple[float, int]:
    fold = np.full(len(y), -1)
    for i, (_, val) in enumerate(splits):
        fold[val] = i
    counts = np.stack([y[fold == i].sum(0) for i in range(k)])
    return float(np.abs(counts / y.sum(0) - 1 / k).max()), int((counts == 0).sum())


def main(n: int = 2000, c: int = 12, k: int = 5, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    prevalence = np.geomspace(0.01, 0.3, c)
    groups = np.arange(n) // 4
    shared = np.repeat(rng.random((n // 4, c)) < prevalence, 4, 0)
    y = np.where(rng.random((n, c)) < 0.5, shared, rng.random((n, c)) < prevalence).astype(float)
    task = MultiLabel([str(i) for i in range(c)])
    for name, splits in (
        ("iterative over groups", task.split(y, k, seed, groups)),
        ("GroupKFold (shuffled)", GroupKFold(k, shuffle=True, random_state=seed).split(y, y, groups)),
    ):
        gap, empty = balance(y, splits, k)
        print(f"{name}: largest |fold share - 1/{k}| {gap:.3f}; (fold, label) cells without a positive: {empty}")


if __name__ == "__main__":
    main()
