"""DeepSpeed checkpoints with the project's client state, written so that a partial save is never resumed.

Every rank calls :meth:`Checkpointer.save` (DeepSpeed's save is collective). After all ranks finished writing,
rank 0 adds ``spnet_complete.json`` to the tag folder; only tags that carry it count as complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from . import distributed as D

COMPLETE = "spnet_complete.json"
CLIENT_KEY = "spnet"


def _step_of(tag: str) -> int:
    m = re.search(r"(\d+)$", tag)
    return int(m.group(1)) if m else -1


def complete_tags(directory: str | Path) -> list[str]:
    """Tags in ``directory`` whose save completed on every rank, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    tags = [p.name for p in d.iterdir() if (p / COMPLETE).is_file()]
    return sorted(tags, key=_step_of)


def resolve_resume(resume: str, directory: str | Path) -> tuple[Path, str] | None:
    """Map ``resume=auto|none|<tag>|<path>`` to (checkpoint dir, tag), or None for a fresh start."""
    if resume in (None, "none", "None", ""):
        return None
    if resume == "auto":
        tags = complete_tags(directory)
        return (Path(directory), tags[-1]) if tags else None
    p = Path(resume)
    if (p / COMPLETE).is_file():
        return p.parent, p.name
    if (Path(directory) / resume / COMPLETE).is_file():
        return Path(directory), resume
    if p.is_dir() and complete_tags(p):
        return p, complete_tags(p)[-1]
    raise FileNotFoundError(
        f"resume={resume!r}: no complete checkpoint there (looked for {COMPLETE} in {p} and in "
        f"{Path(directory) / resume}); use resume=auto, resume=none, a tag in checkpoint.dir or a tag folder path")


class Checkpointer:
    def __init__(self, directory: str | Path, keep_last: int = 3):
        self.directory = Path(directory)
        self.keep_last = keep_last

    def save(self, engine: Any, step: int, client_state: dict[str, Any]) -> Path:
        tag = f"global_step{step}"
        if D.rank() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            stale = self.directory / tag
            if stale.exists():  # an earlier incomplete or superseded save of the same step
                shutil.rmtree(stale)
        if D.is_dist():
            dist.barrier()
        engine.save_checkpoint(str(self.directory), tag=tag, client_state={CLIENT_KEY: client_state})
        if D.is_dist():
            dist.barrier()
        if D.rank() == 0:
            tmp = self.directory / tag / (COMPLETE + ".tmp")
            tmp.write_text(json.dumps({"step": step, "world_size": D.world_size()}))
            os.replace(tmp, self.directory / tag / COMPLETE)
            self._prune()
        if D.is_dist():
            dist.barrier()
        return self.directory / tag

    def _prune(self) -> None:
        tags = complete_tags(self.directory)
        for tag in tags[: max(0, len(tags) - self.keep_last)]:
            shutil.rmtree(self.directory / tag, ignore_errors=True)

    @staticmethod
    def load(engine: Any, directory: Path, tag: str) -> dict[str, Any]:
        path, client = engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {directory / tag}")
        return client[CLIENT_KEY]
