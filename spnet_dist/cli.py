"""`spnet` — one entry point; each verb (spnet_dist/commands/) parses, composes the config, calls one function.
Only the verb that runs is imported."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from types import ModuleType
from typing import Sequence

from .commands import VERBS
from .errors import USER_ERRORS


def build_parser(verb: str | None) -> tuple[argparse.ArgumentParser, ModuleType | None]:
    """All verbs with their help; the arguments (and the module) of ``verb`` only."""
    p = argparse.ArgumentParser(prog="spnet", description="Train and evaluate dynamic-inference ResNets.")
    sub = p.add_subparsers(dest="verb", required=True)
    module = None
    for name, (module_name, help_text) in VERBS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == verb:
            module = importlib.import_module(f".commands.{module_name}", __package__)
            module.add_arguments(sp)
    return p, module


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    parser, module = build_parser(verb if verb in VERBS else None)
    args = parser.parse_args(argv)
    from .config import ConfigError

    try:
        result = module.run(args)
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
