"""python -m pipeline prepare [--params params.yaml]  ->  data/prepared/"""
from __future__ import annotations

from pipeline.cli import parse_args
from pipeline.config import load_params
from pipeline.prepare import prepare

OUT = "data/prepared"


def main(argv=None) -> None:
    args = parse_args(argv, __doc__)
    params = load_params(args.params)
    summary = prepare(params.competition, params.prepare.image_size, params.cv.n_folds, params.cv.seed, OUT,
                      workers=params.prepare.workers)
    print(f"prepared {summary['n_train']} train / {summary['n_test']} test images, "
          f"{summary['n_classes']} classes, from {summary['source']} -> {OUT}")
