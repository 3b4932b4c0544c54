"""spnet eval checkpoint=<path> [key=value ...]: evaluate a checkpoint on one process."""
from __future__ import annotations

import argparse
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..errors import setup_logging
    from ..engine.eval_checkpoint import eval_checkpoint

    setup_logging(0)
    return eval_checkpoint(args.overrides)
