"""spnet submit [--cluster P] [--sweep k=a,b] [--dry-run] [--wait] [key=value ...]: `spnet train` on SLURM."""
from __future__ import annotations

import argparse
import json
from typing import Any


class _Intermixed(argparse.ArgumentParser):
    """Options may come between overrides: `spnet submit a=1 --sweep b=2,3 cluster.nodes=2 --wait`."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if getattr(self, "_mixing", False):
            return super().parse_known_args(args, namespace)
        self._mixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._mixing = False


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.__class__ = _Intermixed
    p.add_argument("overrides", nargs="*", help="training overrides, plus cluster=<profile> / cluster.<key>=<v>")
    p.add_argument("--cluster", help="profile in configs/cluster/ (default: $SPNET_CLUSTER, else local)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=A,B,...",
                   help="one job per value (repeatable: cartesian product); same as a Hydra comma list override")
    p.add_argument("--folder", help="submission folder shared with the compute nodes "
                                    "(default: $SPNET_SUBMIT_DIR, else outputs/slurm)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and the per-job overrides; "
                                                          "submit nothing")
    p.add_argument("--wait", action="store_true", help="wait until every job has finished (through requeues) "
                                                       "and print the training summaries")
    p.add_argument("--wait-timeout", type=float, default=None, metavar="S", help="give up waiting after S s")


def run(args: argparse.Namespace) -> dict[str, Any] | int:
    from ..launch.submit import submit

    out = submit(args.overrides, cluster=args.cluster, folder=args.folder, sweep=args.sweep,
                 dry_run=args.dry_run, wait=args.wait, wait_timeout_s=args.wait_timeout)
    if args.wait and not out.get("ok"):
        print(json.dumps(out, sort_keys=True), flush=True)
        return 1
    return out
