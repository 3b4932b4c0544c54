"""`spnet` — one entry point; each verb (spnet_dist/commands/) parses, composes the config, calls one function."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from typing import Sequence

from .commands import COMMANDS
from .errors import SpnetError

USER_ERRORS = (ValueError, FileNotFoundError, KeyError, SpnetError)


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "mlflow", "alembic", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    p = argparse.ArgumentParser(prog="spnet", description="Train and evaluate dynamic-inference ResNets.")
    sub = p.add_subparsers(dest="verb", required=True)
    modules = {}
    for name in COMMANDS:
        mod = importlib.import_module(f".commands.{name}", __package__)
        mod.add_arguments(sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP))
        modules[mod.NAME] = mod
    return p, modules


def main(argv: Sequence[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    from .config import ConfigError

    try:
        result = modules[args.verb].run(args)
    except ConfigError as err:
        print(f"spnet {args.verb}: config error: {err}", file=sys.stderr)
        return 2
    except USER_ERRORS as err:
        if os.environ.get("SPNET_DEBUG"):
            raise
        print(f"spnet {args.verb}: error: {err}", file=sys.stderr)
        return 2
    if isinstance(result, int):
        return result
    if result is not None:
        print(json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
