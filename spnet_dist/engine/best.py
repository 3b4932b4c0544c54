"""Best-epoch checkpoint (the papers report the epoch with the best validation top-1; spec methods.md §5.e, §6.d).

``BestCheckpoint`` follows every evaluation's top-1; a strictly better one names the checkpoint of that step (the
epoch's checkpoint, written right after its evaluation) as the best. That tag is kept besides
``checkpoint.keep_last`` (never pruned while it is the best; pruned normally once a better one replaces it), named in
``<checkpoint.dir>/best.json`` (tag, path, top-1, epoch, step) and in MLflow (metric ``best/top1``, tags
``best_checkpoint``, ``best_epoch``), and reported in the final JSON line (``best_checkpoint``, ``best_top1``,
``best_epoch``). The best-so-far is hook state saved in every checkpoint, so it survives resume and preemption.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import distributed as D
from ..osutil import write_atomic
from .checkpoint import Checkpointer
from .hook import Hook
from .loop import TrainLoop

BEST_FILE = "best.json"


class BestCheckpoint(Hook):
    name = "best_checkpoint"

    def __init__(self, ckpt: Checkpointer) -> None:
        self.ckpt = ckpt
        self.top1: float | None = None
        self.epoch: int | None = None
        self.step: int | None = None
        self.tag: str | None = None
        self.pending = False  # the best tag is not written yet (its checkpoint follows the evaluation)

    def after_eval(self, loop: TrainLoop, metrics: dict[str, Any]) -> None:
        top1 = metrics.get("top1")
        if top1 is None or (self.top1 is not None and not float(top1) > self.top1):
            return
        prog = loop.progress
        self.top1, self.epoch, self.step, self.tag = float(top1), prog.epoch, prog.step, f"global_step{prog.step}"
        self.ckpt.keep = {self.tag}
        self.pending = True
        if loop.last_ckpt is not None and loop.last_ckpt.name == self.tag:  # saved before this evaluation
            self.record(loop)

    def after_save(self, loop: TrainLoop, path: Any) -> None:
        if self.pending and Path(path).name == self.tag:
            self.record(loop)

    def record(self, loop: TrainLoop) -> None:
        """The best tag exists: point ``best.json`` at it and tell MLflow."""
        self.pending = False
        self.write_pointer()
        loop.tracker.log_metrics({"best/top1": self.top1}, step=loop.progress.step)
        loop.tracker.log_tags({"best_checkpoint": str(self.path()), "best_epoch": str(self.epoch)})

    def after_train(self, loop: TrainLoop) -> None:
        loop.report.update(self.report())

    def path(self) -> Path | None:
        """The best tag's folder, absolute (``best.json``, MLflow)."""
        return (self.ckpt.directory / self.tag).resolve() if self.tag else None

    def report(self) -> dict[str, Any]:
        """The final JSON line's keys, the path written like ``checkpoint`` (None before a best one was written)."""
        written = self.tag is not None and not self.pending
        return {"best_checkpoint": str(self.ckpt.directory / self.tag) if written else None,
                "best_top1": self.top1 if written else None, "best_epoch": self.epoch if written else None}

    def write_pointer(self) -> None:
        if D.rank() == 0 and self.tag is not None:
            info = {"tag": self.tag, "path": str(self.path()), "top1": self.top1, "epoch": self.epoch,
                    "step": self.step}
            write_atomic(self.ckpt.directory / BEST_FILE, json.dumps(info, indent=1), fsync=True)

    def state_dict(self) -> dict[str, Any]:
        return {"top1": self.top1, "epoch": self.epoch, "step": self.step, "tag": self.tag}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The resumed checkpoint's best-so-far wins over ``best.json`` (which may name a later, abandoned tag)."""
        self.top1, self.epoch, self.step, self.tag = state["top1"], state["epoch"], state["step"], state["tag"]
        self.pending = False
        if self.tag is not None:
            self.ckpt.keep = {self.tag}
            if (self.ckpt.directory / self.tag).is_dir():
                self.write_pointer()
