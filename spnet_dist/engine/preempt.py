"""Preemption: SIGTERM / SIGUSR2 ask every rank to save at the next step boundary and exit cleanly.

The signal handler only sets a flag; the training loop all-reduces it each step so all ranks stop at the
same step, save one collective checkpoint and return. The process then exits with EXIT_PREEMPTED.
"""
from __future__ import annotations

import signal
from typing import Any

import torch
import torch.distributed as dist

from .. import distributed as D
from ..errors import EXIT_PREEMPTED, EXIT_RANK_LOST  # noqa: F401  (the exit codes, re-exported)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)

_requested: list[int] = []


def _handler(signum: int, frame: Any) -> None:  # noqa: ARG001
    _requested.append(signum)


def install() -> None:
    """Route SIGTERM and SIGUSR2 to the stop flag (replaces earlier handlers, e.g. submitit's)."""
    _requested.clear()
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)


def requested_signal() -> int | None:
    return _requested[0] if _requested else None


def should_stop() -> bool:
    """True on every rank as soon as any rank received a stop signal (collective on multi-rank runs)."""
    flag = torch.tensor([1.0 if _requested else 0.0], device=D.comm_device())
    if D.is_dist() and D.world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)
