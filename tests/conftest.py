"""Shared fixtures: a tiny Kaggle-format competition written to disk, in the real layout."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import __main__ as cli
from pipeline.config import CompetitionConfig

# Three classes told apart by colour, so a tiny network learns them in an epoch or two.
PALETTE = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (200, 200, 40)]


def make_image(colour: int, rng: np.random.Generator, size: int = 12) -> Image.Image:
    base = np.array(PALETTE[colour], dtype=np.int16)
    pixels = base + rng.integers(-30, 30, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_competition(
    root: Path,
    n_per_class: int = 8,
    n_test: int = 6,
    ext: str = ".jpg",
    labels: tuple[str, ...] = ("cat", "dog", "frog"),
    seed: int = 0,
    size: int = 12,
) -> Path:
    """A Kaggle competition folder: train.csv, train/, test/, sample_submission.csv, solution.csv; images of
    `size` px."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    rows = []
    for c, label in enumerate(labels):
        for i in range(n_per_class):
            image_id = f"tr{c}{i:03d}"
            make_image(c, rng, size).save(root / "train" / f"{image_id}{ext}")
            rows.append((image_id, label))
    pd.DataFrame(rows, columns=["id", "label"]).to_csv(root / "train.csv", index=False)
    test_rows = []
    for i in range(n_test):
        label = labels[i % len(labels)]
        make_image(i % len(labels), rng, size).save(root / "test" / f"te{i:03d}{ext}")
        test_rows.append((f"te{i:03d}", label))
    test = pd.DataFrame(test_rows, columns=["id", "label"])
    test.assign(label=labels[0]).to_csv(root / "sample_submission.csv", index=False)
    test.to_csv(root / "solution.csv", index=False)
    return root


@pytest.fixture
def competition(tmp_path) -> Path:
    return write_competition(tmp_path / "comp")


@pytest.fixture
def comp_config(competition) -> CompetitionConfig:
    return CompetitionConfig(source=str(competition))


def plan_just_over_the_minimum(write_minutes: Callable[[float], None], capsys, over: float = 0.2) -> float:
    """Run the plan stage (in the run's folder) at budget.minutes 0.05, which it refuses with a one-line error
    naming the minimum, then at that minimum + `over`; returns the minutes it planned. The plan re-probes the
    machine each time, so a busy machine can measure a higher minimum the second time: its error names the new
    one, and the next try uses that (three tries)."""
    write_minutes(0.05)
    capsys.readouterr()
    assert cli.main(["plan"]) == 1
    for _ in range(3):
        error = capsys.readouterr().err.strip().splitlines()[-1]
        found = re.search(r"^error: budget.minutes: [\d.]+ is too small .* at least ([\d.]+) minutes", error)
        assert found, error
        minutes = float(found.group(1)) + over
        write_minutes(minutes)
        if cli.main(["plan"]) == 0:
            return minutes
    raise AssertionError(f"the plan refused its own minimum + {over} three times: {error}")
