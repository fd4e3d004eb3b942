"""python -m pipeline prepare [--params params.yaml]  ->  data/prepared/"""

from __future__ import annotations

from pathlib import Path

from pipeline.cli import parse_args
from pipeline.config import load_params
from pipeline.paths import RunPaths
from pipeline.prepare import prepare


def main(argv=None) -> None:
    args = parse_args(argv, __doc__)
    params = load_params(args.params)
    prep, out = params.prepare, RunPaths(Path(".")).prepared
    summary = prepare(
        params.competition,
        prep.image_size,
        params.cv.n_folds,
        params.cv.seed,
        out,
        workers=prep.workers,
        resize=prep.resize,
        skip_bad_images=prep.skip_bad_images,
        holdout=params.cv.holdout,
    )
    print(
        f"prepared {summary['n_train']} train / {summary['n_test']} test images, "
        + (f"{summary['n_holdout']} held out (cv.holdout), " if summary["n_holdout"] else "")
        + f"{summary['target']}, from {summary['source']} -> {out}"
    )
