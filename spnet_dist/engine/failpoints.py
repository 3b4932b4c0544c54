"""Test failpoints as a hook, installed only when ``SPNET_FAILPOINT=<kind>:<step>`` is set:

- ``nan_loss:<step>``: that step's loss becomes NaN;
- ``nan_weights:<step>``: a weight becomes NaN after that step's update (as a NaN gradient with a finite loss would
  leave it);
- ``kill_after_save:<step>``: the process SIGKILLs itself right after the checkpoint of that step, as a crash would.
"""
from __future__ import annotations

import os
import signal
from typing import Any

import torch

from .hook import Hook, StepResult

FAILPOINT_ENV = "SPNET_FAILPOINT"
KINDS = ("nan_loss", "nan_weights", "kill_after_save")


class Failpoints(Hook):
    def __init__(self, kind: str, step: int) -> None:
        if kind not in KINDS:
            raise ValueError(f"{FAILPOINT_ENV}={kind}:{step}: unknown failpoint {kind!r}; choose one of "
                             f"{', '.join(KINDS)}")
        self.kind, self.step = kind, step

    @classmethod
    def from_env(cls) -> "Failpoints | None":
        kind, _, step = os.environ.get(FAILPOINT_ENV, "").partition(":")
        return cls(kind, int(step)) if step else None

    def after_loss(self, loop: Any, loss: torch.Tensor) -> torch.Tensor:
        if self.kind == "nan_loss" and loop.progress.step + 1 == self.step:
            return loss * float("nan")
        return loss

    def after_step(self, loop: Any, result: StepResult) -> None:
        if self.kind == "nan_weights" and result.finite and loop.progress.step == self.step:
            with torch.no_grad():
                next(loop.engine.module.parameters()).view(-1)[0] = float("nan")

    def after_save(self, loop: Any, path: Any) -> None:
        if self.kind == "kill_after_save" and loop.progress.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
