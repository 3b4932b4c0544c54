"""The cached index of a split: its class folders, image files, and (by level) the files found bad.

Three levels of looking at a split, each cached in an *index* (JSON) so a second start costs only a few
``stat`` calls (one per class folder):

* ``list``   — class folders and their image files (what DALI's file reader would see); no file is opened.
* ``quick``  — plus a structural sniff of every file (``sniff.inspect_file``).
* ``decode`` — every file fully decoded with PIL (``spnet check-data`` does this by default).

The index lives in ``<root>/.spnet/`` or, when the data root is read-only, in
``$XDG_CACHE_HOME/spnet/data/<hash of root>/``. It is keyed by the inode and mtime of every class folder, so
adding, removing or renaming files invalidates it; rewriting a file in place does not (run ``spnet check-data``).
Files DALI fails on at run time are added to it (``record_bad_file``) so later runs leave them out.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..osutil import write_atomic
from . import files as listing
from .sniff import inspect_folders

log = logging.getLogger("spnet.data")

LEVELS = ("list", "quick", "decode")
INDEX_VERSION = 2  # 2: the index holds the file names (the pre-flight plan's file lists come from it)


def fingerprint(split_dir: str | Path, classes: Sequence[str] | None = None) -> str:
    """Changes when a class folder is added, removed, renamed or gets/loses files (folder inode + mtime).
    ``classes``: the split's class folders when already listed."""
    split_dir = Path(split_dir)
    h = hashlib.sha1()
    st = split_dir.stat()
    h.update(f"{st.st_ino}:{st.st_mtime_ns}".encode())
    for name in listing.class_dirs(split_dir) if classes is None else classes:
        st = (split_dir / name).stat()
        h.update(f"|{name}:{st.st_ino}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def cache_dir(root: str | Path) -> Path:
    """Where the index of ``root`` lives: $SPNET_DATA_INDEX_DIR/<hash of root> if set (e.g. a shared folder
    for a read-only dataset used by several nodes), else ``<root>/.spnet`` when writable, else
    $XDG_CACHE_HOME/spnet/data/<hash of root>."""
    return Path(_cache_dir(str(Path(root).resolve()), os.environ.get("SPNET_DATA_INDEX_DIR", "")))


@functools.lru_cache(maxsize=64)
def _cache_dir(root_s: str, shared: str) -> str:
    root = Path(root_s)
    if shared:
        d = Path(shared) / hashlib.sha1(root_s.encode()).hexdigest()[:16]
        d.mkdir(parents=True, exist_ok=True)
        return str(d)
    own = root / ".spnet"
    try:
        own.mkdir(exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=own, prefix=".probe"):
            pass
        return str(own)
    except OSError:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        d = base / "spnet" / "data" / hashlib.sha1(root_s.encode()).hexdigest()[:16]
        d.mkdir(parents=True, exist_ok=True)
        return str(d)


def index_path(split_dir: str | Path) -> Path:
    """The index file of a split."""
    split_dir = Path(split_dir)
    d = cache_dir(split_dir.parent)
    d.mkdir(parents=True, exist_ok=True)  # (removed by hand while we run)
    return d / f"index-{split_dir.name}.json"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One scanner per index on this machine: the others wait, then read its result."""
    import fcntl

    with open(path.with_suffix(".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_index(path: Path, fp: str, level: str) -> dict | None:
    idx = _load(path)
    if (idx is None or idx.get("version") != INDEX_VERSION or idx.get("fingerprint") != fp
            or LEVELS.index(idx.get("level", "list")) < LEVELS.index(level)):
        return None
    return idx


def _write(path: Path, idx: dict) -> None:
    write_atomic(path, json.dumps(idx, indent=1, sort_keys=True))


def build_index(split_dir: str | Path, level: str = "list", workers: int | None = None,
                classes: Sequence[str] | None = None) -> dict:
    """List (and at ``quick``/``decode`` level inspect) every image of a split. Not cached; see ``split_index``.
    ``classes``: the split's class folders when already listed."""
    split_dir = Path(split_dir)
    classes = listing.class_dirs(split_dir) if classes is None else list(classes)
    fp = fingerprint(split_dir, classes)  # before the files are listed: a change meanwhile invalidates the index
    counts, ignored, nested, bad, notes = {}, [], [], {}, {}
    names = {}
    for c in classes:
        images, other, subdirs = listing.image_files(split_dir / c)
        counts[c] = len(images)
        names[c] = images
        ignored += [f"{c}/{n}" for n in other]
        nested += [f"{c}/{n}" for n in subdirs]
    if level != "list":
        total = sum(counts.values())
        decode = level == "decode"
        if total > 20000 or decode and total > 2000:
            log.info("data: %s %d files in %s (once; the result is cached)",
                     "decoding" if decode else "checking", total, split_dir)
        jobs = [(str(split_dir / c), names[c], decode) for c in classes]
        for c, (b, n) in zip(classes, inspect_folders(jobs, decode, workers)):
            bad.update({f"{c}/{k}": v for k, v in b.items()})
            notes.update({f"{c}/{k}": v for k, v in n.items()})
    return {"version": INDEX_VERSION, "split_dir": str(split_dir.resolve()), "level": level, "fingerprint": fp,
            "classes": classes, "counts": counts, "files": names, "bad": bad, "notes": notes,
            "ignored_files": ignored, "nested_dirs": nested}


def split_index(split_dir: str | Path, level: str = "list", refresh: bool = False, workers: int | None = None,
                classes: Sequence[str] | None = None) -> dict:
    """The cached index of a split at ``level`` or better; computed (and cached) when missing or stale.
    ``classes``: the split's class folders when already listed (the split is then not listed again)."""
    split_dir = Path(split_dir)
    path = index_path(split_dir)
    classes = listing.class_dirs(split_dir) if classes is None else list(classes)
    fp = fingerprint(split_dir, classes)
    if not refresh and (idx := _read_index(path, fp, level)):
        return idx
    with _locked(path):
        if not refresh and (idx := _read_index(path, fp, level)):
            return idx  # another rank on this machine computed it while we waited
        idx = build_index(split_dir, level, workers, classes=classes)
        old = _load(path) or {}
        if old.get("fingerprint") == idx["fingerprint"]:  # keep files found bad at run time (by DALI)
            runtime = old.get("runtime_bad", {})
            idx["bad"] = {**runtime, **idx["bad"]}
            idx["runtime_bad"] = runtime
        try:
            _write(path, idx)
        except OSError as err:
            log.warning("data: could not cache the file index in %s (%s)", path, err)
        return idx


class CorruptDataError(ValueError):
    """A loader could not read or decode an image; the message names the file and what to do."""


def record_bad_file(split_dir: str | Path, rel: str, reason: str) -> Path | None:
    """Add a file DALI failed on at run time to the split's index, so later runs leave it out."""
    split_dir = Path(split_dir)
    path = index_path(split_dir)
    with _locked(path):
        fp = fingerprint(split_dir)
        idx = _read_index(path, fp, "list") or build_index(split_dir, "list")
        idx.setdefault("runtime_bad", {})[rel] = reason
        idx["bad"][rel] = reason
        try:
            _write(path, idx)
        except OSError:
            return None
    return path
