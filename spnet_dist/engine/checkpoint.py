"""DeepSpeed checkpoints with the project's client state, written so that a partial save is never resumed.

Every rank calls :meth:`Checkpointer.save` (DeepSpeed's save is collective). Once every rank has written,
rank 0 records the size and SHA-256 of every file of the tag and the run's resolved config in
``spnet_complete.json`` and then points ``latest`` at the tag; both files are replaced atomically. A tag without
the marker, or whose files no longer match it (a crash mid-write, a truncated copy, bytes overwritten in place),
is never resumed: ``resume=auto`` falls back to the previous one with one line naming the file and why.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable


from ..errors import SpnetError
from ..osutil import write_atomic
from .. import distributed as D

log = logging.getLogger("spnet.checkpoint")
COMPLETE = "spnet_complete.json"
LATEST = "latest"
CLIENT_KEY = "spnet"


def _step_of(tag: str) -> int:
    m = re.search(r"(\d+)$", tag)
    return int(m.group(1)) if m else -1


def _file_sizes(tag_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
            if p.is_file() and p.name != COMPLETE and not p.name.startswith(f".{COMPLETE}.")}  # (its temp file)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def file_digests(tag_dir: Path, names: Iterable[str]) -> dict[str, str]:
    """SHA-256 of each file (hashlib releases the GIL: one thread per file, up to 8)."""
    names = list(names)
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:
        return dict(zip(names, pool.map(lambda n: _sha256(tag_dir / n), names)))


def read_marker(directory: str | Path, tag: str) -> dict[str, Any]:
    """The completion marker of a tag (raises OSError / ValueError when it is missing or unreadable)."""
    return json.loads((Path(directory) / tag / COMPLETE).read_text())


def complete_tags(directory: str | Path) -> list[str]:
    """Tags in ``directory`` that carry the completion marker, oldest first (not yet verified)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted((p.name for p in d.iterdir() if (p / COMPLETE).is_file()), key=_step_of)


def problem_with(directory: str | Path, tag: str, verify: bool = True) -> str | None:
    """Why the tag cannot be resumed (missing marker, missing or truncated files, with ``verify`` a file whose
    content no longer has the SHA-256 recorded when it was written), or None if it is sound. Tags written before
    checksums were recorded are checked by size only."""
    tag_dir = Path(directory) / tag
    try:
        marker = read_marker(directory, tag)
    except (OSError, ValueError) as err:
        return f"no readable {COMPLETE} ({type(err).__name__}): the save did not complete"
    actual = _file_sizes(tag_dir)
    for name, size in marker.get("files", {}).items():
        if name not in actual:
            return f"file {name} is missing"
        if actual[name] != size:
            return f"file {name} has {actual[name]} bytes, {size} were written"
    expected = marker.get("sha256") or {}
    if verify and expected:
        for name, digest in file_digests(tag_dir, expected).items():
            if digest != expected[name]:
                return f"file {name} does not have the content that was written (SHA-256 differs: damaged in place)"
    return None


def saved_world_size(directory: str | Path, tag: str) -> int:
    return int(read_marker(directory, tag)["world_size"])


def saved_config(directory: str | Path, tag: str) -> dict[str, Any] | None:
    """The resolved config the tag was trained with (None for tags written before the marker held it)."""
    return read_marker(directory, tag).get("config")


def resolve_resume(resume: str | None, directory: str | Path, verify: bool = True, quiet: bool = False,
                   skip: Iterable[str] = ()) -> tuple[Path, str] | None:
    """Map ``resume=auto|none|<tag>|<path>`` to (checkpoint dir, tag), or None for a fresh start. ``auto`` takes
    the newest sound tag not in ``skip`` (one warning per tag passed over unless ``quiet``); ``verify`` checks the
    content hashes, not only the sizes."""
    if resume in (None, "none", "None", ""):
        return None
    if resume == "auto":
        skipped = set(skip)
        for tag in reversed([t for t in complete_tags(directory) if t not in skipped]):
            reason = problem_with(directory, tag, verify)
            if reason is None:
                return Path(directory), tag
            if D.rank() == 0 and not quiet:
                log.warning("resume=auto: skipping checkpoint %s: %s", Path(directory) / tag, reason)
        return None
    p = Path(resume)
    candidates = [(p.parent, p.name), (Path(directory), resume)]
    if p.is_dir() and complete_tags(p):
        candidates.append((p, complete_tags(p)[-1]))
    for d, tag in candidates:
        if (d / tag / COMPLETE).is_file():
            reason = problem_with(d, tag, verify)
            if reason:
                raise ValueError(f"resume={resume!r}: checkpoint {d / tag} is unusable: {reason}; "
                                 f"use resume=auto to take the newest sound one")
            return d, tag
    raise FileNotFoundError(
        f"resume={resume!r}: no complete checkpoint there (looked for {COMPLETE} in {p} and in "
        f"{Path(directory) / resume}); use resume=auto, resume=none, a tag in checkpoint.dir or a tag folder path")


class Checkpointer:
    def __init__(self, directory: str | Path, keep_last: int = 3):
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.keep: set[str] = set()  # tags kept besides the newest keep_last (the best epoch, engine/best.py)

    def save(self, engine: Any, step: int, client_state: dict[str, Any]) -> Path:
        """Collective: every rank must call it. A failed write (disk full, ...) on any rank removes the partial
        tag on every rank's behalf and raises :class:`CheckpointWriteError`; the previous checkpoint and
        ``latest`` are untouched."""
        tag = f"global_step{step}"
        tag_dir = self.directory / tag
        if D.rank() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # an earlier, interrupted save of the same step
                shutil.rmtree(tag_dir)
        D.barrier()
        # Refuse before writing when the disk cannot hold another checkpoint: an exception inside DeepSpeed's
        # collective save would leave the other ranks waiting at its internal barrier.
        error = D.first_error(self._space_problem(engine))
        if error is not None:
            raise CheckpointWriteError(self._failure_message(tag_dir, error))
        error = _attempt(lambda: engine.save_checkpoint(str(self.directory), tag=tag,
                                                        client_state={CLIENT_KEY: client_state}, save_latest=False))
        error = D.first_error(error)
        if error is None and D.rank() == 0:
            def finish() -> None:
                sizes = _file_sizes(tag_dir)
                marker = {"step": step, "world_size": D.world_size(), "files": sizes,
                          "sha256": file_digests(tag_dir, sizes), "config": client_state.get("config")}
                write_atomic(tag_dir / COMPLETE, json.dumps(marker, indent=1), fsync=True)
                write_atomic(self.directory / LATEST, tag, fsync=True)
            error = _attempt(finish)
        error = D.first_error(error)
        if error is not None:
            if D.rank() == 0:
                shutil.rmtree(tag_dir, ignore_errors=True)
            raise CheckpointWriteError(self._failure_message(tag_dir, error))
        if D.rank() == 0:
            self._prune()
        D.barrier()
        return tag_dir

    def _space_problem(self, engine: Any) -> str | None:
        """A reason when the free space is below the size of the last checkpoint (or an estimate for the first)."""
        tags = complete_tags(self.directory)
        if tags:
            marker = read_marker(self.directory, tags[-1])
            need = sum(marker.get("files", {}).values())
        else:  # weights + optimizer state, written once
            need = 2 * sum(p.numel() * p.element_size() for p in engine.module.parameters())
        free = shutil.disk_usage(self.directory).free
        if free < need:
            return f"a checkpoint needs about {need / 2**20:.1f} MiB"
        return None

    def _failure_message(self, tag_dir: Path, error: str) -> str:
        free = shutil.disk_usage(self.directory).free if self.directory.exists() else 0
        tags = [t for t in complete_tags(self.directory) if problem_with(self.directory, t, verify=False) is None]
        kept = f"the previous checkpoint {self.directory / tags[-1]} is intact and `latest` still names it" \
            if tags else "no earlier checkpoint exists"
        full = "the disk is full: " if free < 64 * 2**20 else ""
        return (f"could not write checkpoint {tag_dir} ({full}{free / 2**20:.1f} MiB free; {error}); the partial "
                f"write was removed and {kept}. Free space in {self.directory} or point checkpoint.dir at another "
                f"disk, then rerun the same command (resume=auto continues from the last good checkpoint)")

    def _prune(self) -> None:
        tags = complete_tags(self.directory)
        for tag in [t for t in tags[: max(0, len(tags) - self.keep_last)] if t not in self.keep]:
            shutil.rmtree(self.directory / tag, ignore_errors=True)

    @staticmethod
    def load(engine: Any, directory: Path, tag: str) -> dict[str, Any]:
        path, client = engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {directory / tag}")
        return client[CLIENT_KEY]


class CheckpointWriteError(SpnetError):
    """A checkpoint could not be written; the message names the tag, the free space and what to do."""


def _attempt(fn: Any) -> str | None:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - torch.save reports ENOSPC as RuntimeError, not OSError
        return " ".join(f"{type(err).__name__}: {err}".split())[:300]
    return None


