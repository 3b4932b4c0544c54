"""spnet frontier [--experiment NAME] [--uri URI] [--reference]: Pareto frontier of finished runs, logged to MLflow."""
from __future__ import annotations

import argparse
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", default=None, help="experiment name (default: tracking.experiment)")
    p.add_argument("--uri", default=None, help="tracking store (default: tracking.uri)")
    p.add_argument("--reference", action="store_true",
                   help="overlay the published ImageNet rows of the SP-Net paper (2 x MAC GFLOPs)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. tracking.uri=... (for the defaults)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..errors import setup_logging
    from ..tracking.frontier import frontier

    setup_logging(0)
    uri, experiment = args.uri, args.experiment
    if uri is None or experiment is None:
        from ..config import compose

        cfg = compose(args.overrides)
        uri = uri or str(cfg.tracking.uri)
        experiment = experiment or str(cfg.tracking.experiment)
    return frontier(uri, experiment, reference=args.reference)
