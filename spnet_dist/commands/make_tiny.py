"""spnet make-tiny-imagenet OUT: a tiny learnable ImageNet-format dataset of real JPEGs."""
from __future__ import annotations

import argparse
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=60)
    p.add_argument("--val-per-class", type=int, default=20)
    p.add_argument("--size", type=int, default=None, help="shorter side in pixels (default: varied 64-180)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..data.tiny import make_tiny_imagenet

    return make_tiny_imagenet(args.out, classes=args.classes, train_per_class=args.train_per_class,
                              val_per_class=args.val_per_class, size=args.size, seed=args.seed)
