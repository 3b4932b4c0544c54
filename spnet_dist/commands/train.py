"""spnet train [key=value ...]: train locally (1 or trainer.nprocs ranks) or as one rank of a launcher."""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

MAIN_KEYS = ("data.root", "trainer.epochs", "trainer.max_steps", "trainer.batch_size (per rank)", "trainer.nprocs",
             "optim.lr", "checkpoint.dir", "checkpoint.every_steps", "resume=auto|none|<tag>|<path>",
             "tracking.uri", "tracking.experiment", "eval.execution", "eval.precise_bn_batches", "seed", "name")


def config_help() -> str:
    """The config groups with their options and the main keys, read from the configs/ tree."""
    from ..config import config_dir

    from omegaconf import OmegaConf

    cdir = config_dir()
    defaults = {k: v for d in OmegaConf.load(cdir / "config.yaml").get("defaults", [])
                if not isinstance(d, str) for k, v in d.items()}
    lines = ["config groups (group=option; * = default):"]
    for group in sorted(p for p in cdir.iterdir() if p.is_dir()):
        options = sorted(o.stem for o in group.glob("*.yaml"))
        if options:
            shown = [f"{o}*" if defaults.get(group.name) == o else o for o in options]
            lines.append(f"  {group.name:<10} {' | '.join(shown)}")
    lines += ["main keys (key=value):", *(f"  {k}" for k in MAIN_KEYS),
              "`spnet train --cfg job <overrides>` prints the whole composed config."]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = config_help()
    p.add_argument("overrides", nargs="*", help="Hydra overrides: group=option, key=value, +key=value")
    p.add_argument("--cfg", choices=["job"], help="print the composed config and exit")


def run(args: argparse.Namespace) -> dict[str, Any] | int | None:
    if args.cfg:
        from ..preflight import job_yaml

        print(job_yaml(args.overrides))
        return None
    from ..engine.preempt import EXIT_PREEMPTED
    from ..engine.run import train_from_overrides

    summary = train_from_overrides(args.overrides)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(summary, sort_keys=True), flush=True)
    return EXIT_PREEMPTED if summary.get("preempted") else 0
