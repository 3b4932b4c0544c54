"""spnet check-data [key=value ...]: check a dataset in the ImageNet folder layout; prints a JSON report."""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="e.g. data.root=/data/imagenet (or data=imagenet data.root=...)")
    p.add_argument("--no-decode", action="store_true",
                   help="only sniff file headers/trailers (fast) instead of decoding every image")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")


def run(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from ..errors import setup_logging
    from ..config import ConfigError, compose
    from ..data.report import check_data

    setup_logging(0)
    cfg = compose(args.overrides)
    if OmegaConf.is_missing(cfg.data, "root") or not str(cfg.data.root):
        raise ConfigError("data.root is required: spnet check-data data.root=/path/to/imagenet")
    explicit_model = any(o.lstrip("+").startswith("model") for o in args.overrides)
    given = cfg.model.num_classes if explicit_model else None
    report = check_data(str(cfg.data.root), decode=not args.no_decode,
                        num_classes=None if given in (None, "auto") else int(given), workers=args.workers)
    for line in report["errors"]:
        print(f"spnet check-data: problem: {line}", file=sys.stderr)
    for line in report["warnings"]:
        print(f"spnet check-data: note: {line}", file=sys.stderr)
    print(json.dumps(report, sort_keys=True), flush=True)
    return 0 if report["ok"] else 1
