"""Thin stage entry points: parse arguments, load params, call one library function, write outputs."""

from __future__ import annotations

import argparse

from pipeline.config import Params, load_params
from pipeline.errors import PipelineError


def build_parser(description: str, backbone: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    if backbone:
        parser.add_argument("--backbone", required=True, help="a key of train.backbones")
    return parser


def parse_args(argv, description: str, backbone: bool = False) -> argparse.Namespace:
    return build_parser(description, backbone).parse_args(argv)


def load_with_backbone(args) -> tuple[Params, str]:
    params = load_params(args.params)
    if args.backbone not in params.train.backbones:
        raise PipelineError(f"{args.params}: train.backbones has no key '{args.backbone}'")
    return params, args.backbone
