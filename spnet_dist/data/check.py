"""Data checks for the ImageNet folder layout ``root/{train,val}/<wnid>/*.JPEG``, and the cached file index.

Three levels of looking at a split, each cached in an *index* (JSON) so a second start costs only a few
``stat`` calls (one per class folder):

* ``list``   — class folders and image counts (what DALI's ``file_root`` reader sees); no file is opened.
* ``quick``  — plus a structural sniff of every file: reads the first 16 bytes and the last 4 KiB. Catches empty
  files, non-images, GIFs (DALI cannot decode them), JPEGs without an end-of-image marker and PNGs without IEND
  (truncated); suspicious files are confirmed by a full PIL decode.
* ``decode`` — every file fully decoded with PIL (``spnet check-data`` does this by default); also notes CMYK
  JPEGs and PNG data in .JPEG files, which DALI decodes correctly.

What DALI 2.4 (CPU decoder) does with bad files, as measured: truncated JPEG/PNG, 0-byte files, text or GIF
data -> a "Critical error in pipeline" that kills the pipeline (the error names the file for truncated JPEG
bodies and empty files, but only says ``nvImageCodec failure: '#3'`` for a truncated header, a truncated PNG or
non-image data). CMYK JPEGs, grayscale JPEGs and PNG data named .JPEG decode to correct RGB (identical to PIL).
A JPEG with corrupted (zeroed) entropy data decodes without error to a damaged picture, in DALI and PIL alike;
no check here can tell it from a real picture (its label is still right).

The index lives in ``<root>/.spnet/`` or, when the data root is read-only, in
``$XDG_CACHE_HOME/spnet/data/<hash of root>/``. It is keyed by the inode and mtime of every class folder, so
adding, removing or renaming files invalidates it; rewriting a file in place does not (run ``spnet check-data``).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Collection, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger("spnet.data")

SPLITS = ("train", "val")
# file extensions DALI's file reader picks up in a class folder (case-insensitive), measured on DALI 2.4
DALI_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".pnm", ".ppm", ".pgm", ".pbm", ".jp2",
                       ".webp", ".flac", ".ogg", ".wav"})
LEVELS = ("list", "quick", "decode")
SCAN_CHOICES = ("quick", "decode", "off")
ON_CORRUPT_CHOICES = ("skip", "fail")
INDEX_VERSION = 1
TAIL = 4096
SHOW = 5  # how many names an error message lists


class DataError(ValueError):
    """A problem with the dataset on disk; the message names the folder or file and what to do."""


# ---------------------------------------------------------------------------------------------------- listing

def class_dirs(split_dir: str | Path) -> list[str]:
    """Every sub-folder of ``split_dir``, sorted — exactly the folders DALI's file reader turns into labels
    0..n-1 (hidden and empty folders included)."""
    with os.scandir(split_dir) as it:
        return sorted(e.name for e in it if e.is_dir())


def image_files(class_dir: str | Path) -> tuple[list[str], list[str], list[str]]:
    """(files DALI reads, other files it ignores, sub-folders it ignores) of one class folder, each sorted."""
    images, other, subdirs = [], [], []
    with os.scandir(class_dir) as it:
        for e in it:
            if e.is_dir():
                subdirs.append(e.name)
            elif os.path.splitext(e.name)[1].lower() in DALI_EXTS:
                images.append(e.name)
            else:
                other.append(e.name)
    return sorted(images), sorted(other), sorted(subdirs)


def fingerprint(split_dir: str | Path) -> str:
    """Changes when a class folder is added, removed, renamed or gets/loses files (folder inode + mtime)."""
    split_dir = Path(split_dir)
    h = hashlib.sha1()
    st = split_dir.stat()
    h.update(f"{st.st_ino}:{st.st_mtime_ns}".encode())
    for name in class_dirs(split_dir):
        st = (split_dir / name).stat()
        h.update(f"|{name}:{st.st_ino}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- file checks

def _kind(head: bytes) -> str | None:
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE" or head.startswith((b"fLaC", b"OggS")):
        return "audio"
    if head.startswith((b"\x00\x00\x00\x0cjP  ", b"\xff\x4f\xff\x51")):
        return "jp2"
    if re.match(rb"P[1-6]\s", head):
        return "pnm"
    return None


_EXT_KIND = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".bmp": "bmp", ".tif": "tiff", ".tiff": "tiff",
             ".webp": "webp", ".jp2": "jp2", ".pnm": "pnm", ".ppm": "pnm", ".pgm": "pnm", ".pbm": "pnm"}


def _pil_decode(path: str) -> tuple[str | None, str | None]:
    """(error, PIL mode) of a full decode."""
    from PIL import Image, ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = False
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as im:
            im.load()
            return None, im.mode
    except Exception as err:  # noqa: BLE001 - any decoder failure is the answer
        return f"{type(err).__name__}: {' '.join(str(err).split())}", None


def inspect_file(path: str | Path, decode: bool = False) -> tuple[str | None, str | None]:
    """``(problem, note)`` for one image file. ``problem`` is None when DALI can load the file; ``note`` says
    what is unusual about a file that loads (CMYK, PNG data in a .JPEG file, ...). Without ``decode`` only
    suspicious files are decoded."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(16)
            f.seek(max(0, size - TAIL))
            tail = f.read()
    except OSError as err:
        return f"unreadable ({err.strerror or err})", None
    if size == 0:
        return "empty file (0 bytes)", None
    kind = _kind(head)
    if kind is None:
        return f"not an image (starts with {head[:8]!r})", None
    if kind == "gif":
        return "GIF image: DALI cannot decode GIF; convert it to JPEG", None
    if kind == "audio":
        return "audio file, not an image", None
    ext_kind = _EXT_KIND.get(os.path.splitext(path)[1].lower())
    note = f"{kind.upper()} data in a {os.path.splitext(path)[1]} file (loads)" if ext_kind != kind else None
    end = tail.rstrip(b"\x00")
    truncated = ((kind == "jpeg" and not end.endswith(b"\xff\xd9"))
                 or (kind == "png" and not end.endswith(b"IEND\xaeB`\x82")))
    if decode or truncated:
        err, mode = _pil_decode(path)
        if err:
            what = f"truncated {kind.upper()}" if truncated else f"undecodable {kind.upper()}"
            return f"{what} ({err})", None
        if mode == "CMYK":
            note = "CMYK JPEG (loads; DALI converts it to RGB)" if kind == "jpeg" else f"CMYK {kind.upper()} (loads)"
        if truncated and not note:
            note = f"{kind.upper()} with data after its end marker (loads)"
    return None, note


def _inspect_class(args: tuple[str, list[str], bool]) -> tuple[dict[str, str], dict[str, str]]:
    class_dir, names, decode = args
    bad, notes = {}, {}
    for n in names:
        problem, note = inspect_file(os.path.join(class_dir, n), decode)
        if problem:
            bad[n] = problem
        elif note:
            notes[n] = note
    return bad, notes


# --------------------------------------------------------------------------------------------------- index

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


def _index_path(split_dir: Path) -> Path:
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


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temp file + rename (readers never see half a file); readable by others like a normal file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_json(path: Path, data: Any) -> None:
    _write_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def _read_index(path: Path, fp: str, level: str) -> dict | None:
    try:
        idx = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (idx.get("version") != INDEX_VERSION or idx.get("fingerprint") != fp
            or LEVELS.index(idx.get("level", "list")) < LEVELS.index(level)):
        return None
    return idx


def build_index(split_dir: str | Path, level: str = "list", workers: int | None = None) -> dict:
    """List (and at ``quick``/``decode`` level inspect) every image of a split. Not cached; see ``split_index``."""
    split_dir = Path(split_dir)
    fp = fingerprint(split_dir)
    classes = class_dirs(split_dir)
    counts, ignored, nested, bad, notes = {}, [], [], {}, {}
    listing = {}
    for c in classes:
        images, other, subdirs = image_files(split_dir / c)
        counts[c] = len(images)
        listing[c] = images
        ignored += [f"{c}/{n}" for n in other]
        nested += [f"{c}/{n}" for n in subdirs]
    if level != "list":
        total = sum(counts.values())
        decode = level == "decode"
        if total > 20000 or decode and total > 2000:
            log.info("data: %s %d files in %s (once; the result is cached)",
                     "decoding" if decode else "checking", total, split_dir)
        jobs = [(str(split_dir / c), listing[c], decode) for c in classes]
        for c, (b, n) in zip(classes, _map(jobs, decode, workers)):
            bad.update({f"{c}/{k}": v for k, v in b.items()})
            notes.update({f"{c}/{k}": v for k, v in n.items()})
    return {"version": INDEX_VERSION, "split_dir": str(split_dir.resolve()), "level": level, "fingerprint": fp,
            "classes": classes, "counts": counts, "bad": bad, "notes": notes, "ignored_files": ignored,
            "nested_dirs": nested}


def _map(jobs: list, decode: bool, workers: int | None) -> list:
    if not jobs:
        return []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    files = sum(len(j[1]) for j in jobs)
    if decode and files > 400 and (workers or cores) > 1:
        import multiprocessing
        import sys
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        # PIL decoding holds the GIL: processes. fork is cheap but unsafe once torch/DALI started threads.
        heavy = any(m in sys.modules for m in ("torch", "nvidia.dali"))
        ctx = multiprocessing.get_context("spawn" if heavy else "fork")
        try:
            with ProcessPoolExecutor(workers or cores, mp_context=ctx) as ex:
                return list(ex.map(_inspect_class, jobs, chunksize=max(1, len(jobs) // (8 * cores))))
        except (BrokenProcessPool, OSError) as err:  # e.g. spawn cannot re-import an interactive __main__
            log.warning("data: decoding in worker processes failed (%s); decoding in threads instead", err)
    with ThreadPoolExecutor(workers or min(32, 4 * cores)) as ex:  # sniffing is I/O-bound
        return list(ex.map(_inspect_class, jobs))


def split_index(split_dir: str | Path, level: str = "list", refresh: bool = False,
                workers: int | None = None) -> dict:
    """The cached index of a split at ``level`` or better; computed (and cached) when missing or stale."""
    split_dir = Path(split_dir)
    path = _index_path(split_dir)
    fp = fingerprint(split_dir)
    if not refresh and (idx := _read_index(path, fp, level)):
        return idx
    with _locked(path):
        if not refresh and (idx := _read_index(path, fingerprint(split_dir), level)):
            return idx  # another rank on this machine computed it while we waited
        idx = build_index(split_dir, level, workers)
        old = _read_index(path, idx["fingerprint"], "list")
        if old:  # keep files found bad at run time (by DALI) for the same listing
            idx["bad"] = {**old.get("runtime_bad", {}), **idx["bad"]}
            idx["runtime_bad"] = old.get("runtime_bad", {})
        try:
            _write_json(path, idx)
        except OSError as err:
            log.warning("data: could not cache the file index in %s (%s)", path, err)
        return idx


def record_bad_file(split_dir: str | Path, rel: str, reason: str) -> Path | None:
    """Add a file DALI failed on at run time to the split's index, so later runs leave it out."""
    split_dir = Path(split_dir)
    path = _index_path(split_dir)
    with _locked(path):
        fp = fingerprint(split_dir)
        idx = _read_index(path, fp, "list") or build_index(split_dir, "list")
        idx.setdefault("runtime_bad", {})[rel] = reason
        idx["bad"][rel] = reason
        try:
            _write_json(path, idx)
        except OSError:
            return None
    return path


def file_list(split_dir: str | Path, idx: dict) -> str | None:
    """A DALI ``file_list`` of the split without ``idx['bad']`` (labels = index in the full sorted class list,
    as ``file_root`` would give), or None when nothing is left out (the reader then uses ``file_root``)."""
    if not idx["bad"]:
        return None
    split_dir = Path(split_dir)
    digest = hashlib.sha1(json.dumps(sorted(idx["bad"])).encode()).hexdigest()[:10]
    path = cache_dir(split_dir.parent) / f"files-{split_dir.name}-{idx['fingerprint'][:10]}-{digest}.txt"
    if not path.is_file():
        lines = []
        for label, c in enumerate(idx["classes"]):
            for n in image_files(split_dir / c)[0]:
                if f"{c}/{n}" not in idx["bad"]:
                    lines.append(f"{c}/{n} {label}\n")
        _write_atomic(path, "".join(lines))
    return str(path)


# ------------------------------------------------------------------------------------------ training checks

def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _names(items: list[str], show: int = SHOW) -> str:
    head = ", ".join(items[:show])
    return head + (f" and {len(items) - show} more" if len(items) > show else "")


def check_layout(root: str | Path) -> None:
    """Fail early, naming the path, when the ImageNet folder layout is missing."""
    root = Path(root)
    for split in SPLITS:
        d = root / split
        if not d.is_dir() or not any(p.is_dir() for p in d.iterdir()):
            raise FileNotFoundError(
                f"data.root={str(root)!r}: no class folders in {d}; expected {root}/train/<wnid>/*.JPEG and "
                f"{root}/val/<wnid>/*.JPEG (make a tiny one with `spnet make-tiny-imagenet {root}`, or prepare "
                f"ImageNet with `spnet prepare-imagenet`)")


def check_classes_agree(root: str | Path) -> list[str]:
    """The class list; raises DataError when train and val class folders differ (labels would not match)."""
    root = Path(root)
    train, val = class_dirs(root / "train"), class_dirs(root / "val")
    if train == val:
        return train
    missing = sorted(set(train) - set(val))
    extra = sorted(set(val) - set(train))
    parts = []
    if missing:
        parts.append(f"val has no folder for {len(missing)} of the {len(train)} train classes ({_names(missing)})")
    if extra:
        parts.append(f"val has {len(extra)} class folder(s) that train lacks ({_names(extra)})")
    raise DataError(f"data.root={str(root)!r}: {'; '.join(parts)}. DALI numbers the class folders of each split "
                    f"separately, so labels would not match; make both splits hold the same <wnid> folders "
                    f"(`spnet prepare-imagenet` does), then run `spnet check-data data.root={root}`")


def quick_check(data_cfg: Any, num_classes: int | None, batch_size: int | None = None, world: int = 1,
                level: str = "list") -> dict[str, dict]:
    """Cheap check at the start of training (no decoding): layout, train/val class agreement, no empty or
    hidden class folders, ``num_classes`` equals the number of classes, and (with ``batch_size`` per rank and
    ``world`` ranks) enough training images for one step. Raises one DataError (a ValueError) or
    FileNotFoundError naming the problem; returns the two split indexes. A cached index makes it a few stat
    calls; without one it lists the class folders (no file is opened at ``level='list'``)."""
    root = Path(str(_get(data_cfg, "root")))
    check_layout(root)
    classes = check_classes_agree(root)
    idx = {s: split_index(root / s, level) for s in SPLITS}
    hidden = [c for c in classes if c.startswith(".")]
    if hidden:
        raise DataError(f"data.root={str(root)!r}: hidden folder(s) {_names(hidden)} in train/ and val/ are taken "
                        f"as classes by DALI; move them out of the dataset")
    empty = [f"{s}/{c}" for s in SPLITS for c in classes if idx[s]["counts"][c] - _bad_in(idx[s], c) <= 0]
    if empty:
        raise DataError(f"data.root={str(root)!r}: {len(empty)} class folder(s) without usable images: "
                        f"{_names(empty)}; every class needs train and val images (re-run `spnet prepare-imagenet`"
                        f", or `spnet check-data data.root={root}` for details)")
    if num_classes is not None and int(num_classes) != len(classes):
        raise DataError(f"model.num_classes={num_classes} but data.root={str(root)!r} has {len(classes)} classes "
                        f"(folders in train/); set model.num_classes={len(classes)}")
    if batch_size:
        images = sum(idx["train"]["counts"].values()) - len(idx["train"]["bad"])
        world = max(1, int(world))
        if images // world < int(batch_size):
            raise DataError(f"trainer.batch_size={batch_size} is too large: {world} rank(s) x {batch_size} = "
                            f"{world * int(batch_size)} images per step, but data.root={str(root)!r} has "
                            f"{images} usable training images, so an epoch would have no step; use "
                            f"trainer.batch_size<={max(1, images // world)}")
    return idx


def _bad_in(idx: dict, c: str) -> int:
    return sum(1 for k in idx["bad"] if k.split("/", 1)[0] == c)


_warned: set[tuple] = set()


def usable_files(split_dir: str | Path, scan: str, on_corrupt: str,
                 exclude: Collection[str] = ()) -> tuple[str | None, dict[str, str]]:
    """(DALI file_list or None, {file: reason} left out) for a split, by ``data.scan`` / ``data.on_corrupt``.

    ``scan=off``: no index, the reader lists the folder itself (None, {}). Otherwise the cached index at that
    level; with ``on_corrupt=fail`` any undecodable file raises DataError naming it, with ``skip`` they are left
    out and a warning names them. ``exclude`` (``<class>/<file>`` paths, e.g. BoostNet's held-out split) is
    left out as well, labels unchanged."""
    if scan not in SCAN_CHOICES:
        raise DataError(f"data.scan={scan!r} is not valid; choose one of {', '.join(SCAN_CHOICES)}")
    if on_corrupt not in ON_CORRUPT_CHOICES:
        raise DataError(f"data.on_corrupt={on_corrupt!r} is not valid; choose one of {', '.join(ON_CORRUPT_CHOICES)}")
    if scan == "off" and not exclude:
        return None, {}
    split_dir = Path(split_dir)
    idx = split_index(split_dir, scan if scan != "off" else "quick")
    bad = idx["bad"]
    held = {f: "excluded (held out)" for f in exclude}
    if not bad:
        return (file_list(split_dir, {**idx, "bad": held}) if held else None), {}
    shown = "; ".join(f"{split_dir / k}: {v}" for k, v in sorted(bad.items())[:SHOW])
    more = f"; and {len(bad) - SHOW} more (all listed in {_index_path(split_dir)})" if len(bad) > SHOW else ""
    if on_corrupt == "fail":
        raise DataError(f"{len(bad)} undecodable image file(s) in {split_dir} (data.on_corrupt=fail): {shown}{more}. "
                        f"Replace or delete them, or set data.on_corrupt=skip to train without them")
    key = (str(split_dir), idx["fingerprint"], tuple(sorted(bad)))
    if os.environ.get("RANK", "0") == "0" and key not in _warned:  # every rank computes the same list
        _warned.add(key)
        log.warning("data: leaving out %d undecodable image file(s) of %s (data.on_corrupt=skip): %s%s",
                    len(bad), split_dir, shown, more)
    return file_list(split_dir, {**idx, "bad": {**bad, **held}}), bad


# ------------------------------------------------------------------------------------------ check-data report

def check_data(root: str | Path, decode: bool = True, num_classes: int | None = None,
               workers: int | None = None) -> dict[str, Any]:
    """The full report of ``spnet check-data``; refreshes the cached index (level ``decode`` or ``quick``)."""
    root = Path(root)
    report: dict[str, Any] = {"root": str(root), "level": "decode" if decode else "quick", "errors": [],
                              "warnings": [], "splits": {}}
    errors, warnings = report["errors"], report["warnings"]
    present = []
    for s in SPLITS:
        d = root / s
        if not d.is_dir():
            errors.append(f"missing folder {d} (expected {root}/{s}/<wnid>/*.JPEG)")
            continue
        idx = split_index(d, report["level"], refresh=True, workers=workers)
        present.append(s)
        counts = idx["counts"]
        usable = {c: n - _bad_in(idx, c) for c, n in counts.items()}
        report["splits"][s] = {
            "classes": len(idx["classes"]), "images": sum(counts.values()), "usable_images": sum(usable.values()),
            "min_per_class": min(usable.values(), default=0), "max_per_class": max(usable.values(), default=0),
            "per_class": counts,
            "empty_classes": [c for c in idx["classes"] if usable[c] == 0],
            "undecodable": [{"file": str(d / k), "reason": v} for k, v in sorted(idx["bad"].items())],
            "loads_with_notes": [{"file": str(d / k), "note": v} for k, v in sorted(idx["notes"].items())],
            "ignored_files": [str(d / k) for k in idx["ignored_files"]],
            "nested_dirs": [str(d / k) for k in idx["nested_dirs"]],
            "index": str(_index_path(d)),
        }
        r = report["splits"][s]
        if not idx["classes"]:
            errors.append(f"no class folders in {d}")
        if r["empty_classes"]:
            errors.append(f"{s}: {len(r['empty_classes'])} class folder(s) without usable images: "
                          f"{_names(r['empty_classes'])}")
        hidden = [c for c in idx["classes"] if c.startswith(".")]
        if hidden:
            errors.append(f"{s}: hidden folder(s) {_names(hidden)} are taken as classes by DALI; move them out")
        if r["undecodable"]:
            errors.append(f"{s}: {len(r['undecodable'])} undecodable file(s): "
                          f"{_names([u['file'] + ' (' + u['reason'] + ')' for u in r['undecodable']])}; training "
                          f"leaves them out with data.on_corrupt=skip, stops with data.on_corrupt=fail")
        if r["ignored_files"]:
            warnings.append(f"{s}: {len(r['ignored_files'])} file(s) without an image extension are ignored by the "
                            f"reader: {_names(r['ignored_files'])}")
        if r["nested_dirs"]:
            warnings.append(f"{s}: {len(r['nested_dirs'])} sub-folder(s) inside class folders are ignored by the "
                            f"reader: {_names(r['nested_dirs'])}")
        if r["loads_with_notes"]:
            warnings.append(f"{s}: {len(r['loads_with_notes'])} file(s) are unusual but load fine: "
                            f"{_names([n['file'] + ' (' + n['note'] + ')' for n in r['loads_with_notes']])}")
    if present == list(SPLITS):
        train, val = report["splits"]["train"], report["splits"]["val"]
        t, v = set(train["per_class"]), set(val["per_class"])
        report["classes_only_in_train"] = sorted(t - v)
        report["classes_only_in_val"] = sorted(v - t)
        if t != v:
            errors.append(f"train and val class folders differ: {len(t - v)} only in train "
                          f"({_names(sorted(t - v))}), {len(v - t)} only in val ({_names(sorted(v - t))}); labels "
                          f"would not match")
        report["num_classes"] = len(t)
        if num_classes is not None and int(num_classes) != len(t):
            warnings.append(f"model.num_classes={num_classes} differs from the {len(t)} classes here; train with "
                            f"model.num_classes={len(t)}")
    report["ok"] = not errors
    return report
