"""spnet prepare-imagenet --src DIR --out DIR: ILSVRC2012 (official archives or Kaggle) -> out/{train,val}/<wnid>/."""
from __future__ import annotations

import argparse
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--src", required=True, help="folder with ILSVRC2012_img_{train,val}.tar + "
                   "ILSVRC2012_devkit_t12.tar.gz, or with ILSVRC/Data/CLS-LOC/ + LOC_val_solution.csv (Kaggle)")
    p.add_argument("--out", required=True, help="output folder (train/ and val/ are created in it)")
    p.add_argument("--layout", choices=["auto", "ilsvrc", "kaggle"], default="auto")
    p.add_argument("--link", choices=["auto", "hardlink", "copy"], default="auto",
                   help="Kaggle files: hard-link when on the same file system (auto), always, or copy")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..errors import setup_logging
    from ..data.prepare import prepare_imagenet

    setup_logging(0)
    return prepare_imagenet(args.src, args.out, layout=args.layout, link=args.link)
