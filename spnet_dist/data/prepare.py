"""Prepare ILSVRC2012 as ``out/{train,val}/<wnid>/*.JPEG`` (the layout DALI's file reader and `spnet train` use).

Sources (``layout``):

* ``ilsvrc`` — the official archives in ``src``: ``ILSVRC2012_img_train.tar`` (one ``<wnid>.tar`` per class),
  ``ILSVRC2012_img_val.tar`` (50 000 flat JPEGs) and ``ILSVRC2012_devkit_t12.tar.gz``, whose ``data/meta.mat``
  maps ILSVRC2012_ID -> WNID and whose ``data/ILSVRC2012_validation_ground_truth.txt`` lists the ID of each val
  image in order (line i is ``ILSVRC2012_val_<i:08d>.JPEG``).
* ``kaggle`` — the Kaggle "ImageNet Object Localization Challenge" download: ``ILSVRC/Data/CLS-LOC/train/<wnid>/``,
  ``ILSVRC/Data/CLS-LOC/val/*.JPEG`` (flat) and ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the first
  token of PredictionString is the wnid).
* ``auto`` — whichever of the two ``src`` holds.

Safe to interrupt and re-run: each class is written into ``out/.spnet/prepare/tmp/`` and renamed into place
when complete, so a class folder in ``out`` is always whole; a re-run skips the classes already there and
finishes the rest. The source is only read: archives are extracted, Kaggle files are hard-linked (same file
system) or copied (``link``).
"""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import re
import shutil
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .files import IMAGE_EXTS, SPLITS, class_dirs

log = logging.getLogger("spnet.prepare")

ILSVRC_TRAIN = "ILSVRC2012_img_train.tar"
ILSVRC_VAL = "ILSVRC2012_img_val.tar"
ILSVRC_DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
KAGGLE_TRAIN = Path("ILSVRC/Data/CLS-LOC/train")
KAGGLE_VAL = Path("ILSVRC/Data/CLS-LOC/val")
KAGGLE_CSV = "LOC_val_solution.csv"
LAYOUTS = ("auto", "ilsvrc", "kaggle")
LINKS = ("auto", "hardlink", "copy")
WNID = re.compile(r"^n\d{8}$")
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d+)\.JPEG$", re.I)


class PrepareError(ValueError):
    """The source is not what the layout needs, or the result would be wrong; the message says what to do."""


# ------------------------------------------------------------------------------------------------- layouts

def _ilsvrc_missing(src: Path) -> list[str]:
    return [n for n in (ILSVRC_TRAIN, ILSVRC_VAL, ILSVRC_DEVKIT) if not (src / n).is_file()]


def _kaggle_missing(src: Path) -> list[str]:
    return [str(p) for p in (KAGGLE_TRAIN, KAGGLE_VAL) if not (src / p).is_dir()] + \
        ([KAGGLE_CSV] if not (src / KAGGLE_CSV).is_file() else [])


def detect_layout(src: str | Path, layout: str = "auto") -> str:
    """``ilsvrc`` or ``kaggle``; raises PrepareError naming the missing files."""
    src = Path(src)
    if layout not in LAYOUTS:
        raise PrepareError(f"--layout {layout}: choose one of {', '.join(LAYOUTS)}")
    if not src.is_dir():
        raise PrepareError(f"--src {src}: no such folder")
    il, kg = _ilsvrc_missing(src), _kaggle_missing(src)
    if layout == "ilsvrc" and il:
        raise PrepareError(f"--src {src} lacks {', '.join(il)} (the official ILSVRC2012 archives); download them "
                           f"from image-net.org, or use --layout kaggle for the Kaggle download")
    if layout == "kaggle" and kg:
        raise PrepareError(f"--src {src} lacks {', '.join(kg)} (the Kaggle layout); point --src at the folder "
                           f"holding ILSVRC/ and {KAGGLE_CSV}, or use --layout ilsvrc for the official archives")
    if layout != "auto":
        return layout
    if not il and not kg:
        raise PrepareError(f"--src {src} holds both the official archives and the Kaggle layout; choose one with "
                           f"--layout ilsvrc or --layout kaggle")
    if not il:
        return "ilsvrc"
    if not kg:
        return "kaggle"
    raise PrepareError(f"--src {src} holds neither layout: the official archives need {', '.join(il)}; the Kaggle "
                       f"layout needs {', '.join(kg)}")


# ----------------------------------------------------------------------------------------------- the steps

class _Out:
    """The output folder: whole class folders appear by rename from a temp area inside it."""

    def __init__(self, out: Path, link: str):
        self.out = out
        self.state = out / ".spnet" / "prepare"
        self.tmp = self.state / "tmp"
        self.link = link
        self.linked = self.copied = 0
        self.done_now: dict[str, int] = {s: 0 for s in SPLITS}
        for s in SPLITS:
            (out / s).mkdir(parents=True, exist_ok=True)
        self.done_before = {s: len(class_dirs(out / s)) for s in SPLITS}
        self.state.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)  # leftovers of an interrupted run (ours, never the source)
        self.tmp.mkdir()

    def has(self, split: str, wnid: str) -> bool:
        return (self.out / split / wnid).is_dir()

    def staging(self, split: str, wnid: str) -> Path:
        d = self.tmp / split / wnid
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    def publish(self, split: str, wnid: str) -> None:
        os.rename(self.tmp / split / wnid, self.out / split / wnid)
        self.done_now[split] += 1

    def place(self, src: Path, dst: Path) -> None:
        """Hard-link (same file system) or copy ``src`` to ``dst``; the source is never changed."""
        if self.link != "copy":
            try:
                os.link(src, dst)
                self.linked += 1
                return
            except OSError as err:
                if self.link == "hardlink":
                    raise PrepareError(f"cannot hard-link {src} into {dst.parent} ({err.strerror}); use --link copy "
                                       f"or an --out on the same file system") from None
                self.link = "copy"  # auto: another file system (EXDEV) or links not allowed: copy from now on
        shutil.copyfile(src, dst)
        self.copied += 1

    def marker(self, name: str) -> Path:
        return self.state / f"{name}.done"


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    (out / ".spnet").mkdir(exist_ok=True)
    with open(out / ".spnet" / "prepare.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise PrepareError(f"another `spnet prepare-imagenet` is writing to {out}; wait for it to finish") from None
        yield


def _safe_name(name: str) -> str | None:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    if not base or base.startswith(".") or os.path.splitext(base)[1].lower() not in IMAGE_EXTS:
        return None
    return base


def _extract_members(tar: tarfile.TarFile, dest: Path) -> int:
    """Regular image files of ``tar`` (read as a stream) into ``dest`` by base name; links and paths ignored."""
    n = 0
    for m in tar:
        name = _safe_name(m.name) if m.isfile() else None
        if name is None:
            continue
        f = tar.extractfile(m)
        if f is None:
            continue
        with f, open(dest / name, "wb") as g:
            shutil.copyfileobj(f, g, 1 << 20)
        n += 1
    return n


def _progress(split: str, i: int, total: int | None, t0: float) -> None:
    if i % 50 == 0:
        log.info("prepare: %s %d%s classes (%.0f s)", split, i, f"/{total}" if total else "", time.time() - t0)


# ------------------------------------------------------------------------------------------------- ILSVRC

def read_devkit(devkit: str | Path) -> tuple[dict[int, str], list[int]]:
    """({ILSVRC2012_ID: wnid}, val ground-truth IDs in val-image order) from ILSVRC2012_devkit_t12.tar.gz."""
    import numpy as np
    import scipy.io

    meta = gt = None
    with tarfile.open(devkit, "r:*") as tar:
        for m in tar:
            if not m.isfile():
                continue
            if m.name.endswith("data/meta.mat"):
                meta = tar.extractfile(m).read()  # type: ignore[union-attr]
            elif m.name.endswith("data/ILSVRC2012_validation_ground_truth.txt"):
                gt = tar.extractfile(m).read().decode()  # type: ignore[union-attr]
    if meta is None or gt is None:
        raise PrepareError(f"{devkit} lacks data/meta.mat or data/ILSVRC2012_validation_ground_truth.txt; is it "
                           f"the ILSVRC2012 development kit (Task 1 & 2)?")
    try:
        synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        ids = [int(np.asarray(x).item()) for x in np.atleast_1d(synsets["ILSVRC2012_ID"])]
        wnids = [str(np.asarray(x).item()) for x in np.atleast_1d(synsets["WNID"])]
    except (KeyError, ValueError, TypeError, IndexError) as err:
        raise PrepareError(f"{devkit}: data/meta.mat has no readable 'synsets' struct with ILSVRC2012_ID and WNID "
                           f"({type(err).__name__}: {err})") from None
    mapping = dict(zip(ids, wnids))
    try:
        truth = [int(line) for line in gt.split()]
    except ValueError as err:
        raise PrepareError(f"{devkit}: ILSVRC2012_validation_ground_truth.txt is not one ID per line ({err})") from None
    unknown = sorted({i for i in truth if i not in mapping})
    if unknown:
        raise PrepareError(f"{devkit}: the val ground truth uses IDs missing from meta.mat: {unknown[:5]}")
    return mapping, truth


def _prepare_ilsvrc(src: Path, o: _Out) -> list[str]:
    notes: list[str] = []
    mapping, truth = read_devkit(src / ILSVRC_DEVKIT)
    t0 = time.time()
    with tarfile.open(src / ILSVRC_TRAIN, "r:") as outer:  # seekable: skipping a finished class is a seek
        i = 0
        for member in outer:
            wnid = Path(member.name).name[: -len(".tar")] if member.name.endswith(".tar") else None
            if not member.isfile() or not wnid or not WNID.match(wnid):
                notes.append(f"{ILSVRC_TRAIN}: ignored member {member.name}")
                continue
            i += 1
            if o.has("train", wnid):
                continue
            dest = o.staging("train", wnid)
            with tarfile.open(fileobj=outer.extractfile(member), mode="r|*") as inner:
                if not _extract_members(inner, dest):
                    raise PrepareError(f"{ILSVRC_TRAIN}: {member.name} holds no images; the archive is damaged")
            o.publish("train", wnid)
            _progress("train", i, None, t0)
    if o.marker("val").is_file():
        return notes
    seen = 0
    with tarfile.open(src / ILSVRC_VAL, "r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            match = VAL_NAME.search(m.name)
            if not match:
                notes.append(f"{ILSVRC_VAL}: ignored member {m.name}")
                continue
            k = int(match.group(1))
            if not 1 <= k <= len(truth):
                raise PrepareError(f"{ILSVRC_VAL}: {m.name} has no line in the devkit's validation ground truth "
                                   f"({len(truth)} lines); are the archives from the same release?")
            seen += 1
            wnid = mapping[truth[k - 1]]
            if o.has("val", wnid):
                continue
            d = o.tmp / "val" / wnid
            d.mkdir(parents=True, exist_ok=True)
            f = tar.extractfile(m)
            with f, open(d / Path(m.name).name, "wb") as g:  # type: ignore[union-attr]
                shutil.copyfileobj(f, g, 1 << 20)  # type: ignore[arg-type]
    if seen != len(truth):
        raise PrepareError(f"{ILSVRC_VAL} holds {seen} val images but the devkit's ground truth lists {len(truth)}; "
                           f"the archive is incomplete or from another release")
    _publish_staged(o, "val")
    o.marker("val").write_text(f"{seen}\n")
    return notes


def _publish_staged(o: _Out, split: str) -> None:
    staged = o.tmp / split
    for wnid in sorted(p.name for p in staged.iterdir()) if staged.is_dir() else []:
        if not o.has(split, wnid):
            o.publish(split, wnid)


# ------------------------------------------------------------------------------------------------- Kaggle

def read_kaggle_solution(path: str | Path) -> dict[str, str]:
    """{ImageId: wnid} from LOC_val_solution.csv (first token of PredictionString)."""
    out: dict[str, str] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise PrepareError(f"{path}: expected the header ImageId,PredictionString, got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            tokens = (row.get("PredictionString") or "").split()
            if not row.get("ImageId") or not tokens or not WNID.match(tokens[0]):
                raise PrepareError(f"{path} line {line}: no wnid as the first token of PredictionString: {row}")
            out[row["ImageId"].strip()] = tokens[0]
    return out


def _prepare_kaggle(src: Path, o: _Out) -> list[str]:
    notes: list[str] = []
    train = src / KAGGLE_TRAIN
    wnids = class_dirs(train)
    odd = [w for w in wnids if not WNID.match(w)]
    if odd:
        raise PrepareError(f"{train}: folders that are not wnids (n + 8 digits): {odd[:5]}")
    t0 = time.time()
    for i, wnid in enumerate(wnids, start=1):
        if o.has("train", wnid):
            continue
        dest = o.staging("train", wnid)
        n = 0
        with os.scandir(train / wnid) as it:
            for e in it:
                name = _safe_name(e.name) if e.is_file() else None
                if name:
                    o.place(Path(e.path), dest / name)
                    n += 1
        if not n:
            raise PrepareError(f"{train / wnid} holds no images; the download is incomplete")
        o.publish("train", wnid)
        _progress("train", i, len(wnids), t0)
    if o.marker("val").is_file():
        return notes
    labels = read_kaggle_solution(src / KAGGLE_CSV)
    val = src / KAGGLE_VAL
    files = {os.path.splitext(e.name)[0]: e.name for e in os.scandir(val) if e.is_file() and _safe_name(e.name)}
    missing = sorted(set(labels) - set(files))
    if missing:
        raise PrepareError(f"{len(missing)} val image(s) listed in {KAGGLE_CSV} are not in {val}: "
                           f"{', '.join(missing[:5])}; the download is incomplete")
    unlabeled = sorted(set(files) - set(labels))
    if unlabeled:
        notes.append(f"{len(unlabeled)} val image(s) without a row in {KAGGLE_CSV} were left out: "
                     f"{', '.join(unlabeled[:5])}")
    for image_id, wnid in sorted(labels.items()):
        if o.has("val", wnid):
            continue
        d = o.tmp / "val" / wnid
        d.mkdir(parents=True, exist_ok=True)
        o.place(val / files[image_id], d / files[image_id])
    _publish_staged(o, "val")
    o.marker("val").write_text(f"{len(labels)}\n")
    return notes


# ---------------------------------------------------------------------------------------------------- entry

def prepare_imagenet(src: str | Path, out: str | Path, layout: str = "auto", link: str = "auto") -> dict[str, Any]:
    """Write ``out/{train,val}/<wnid>/`` from ``src``; returns a summary. Idempotent and resumable."""
    src, out = Path(src).resolve(), Path(out).resolve()
    if link not in LINKS:
        raise PrepareError(f"--link {link}: choose one of {', '.join(LINKS)}")
    layout = detect_layout(src, layout)
    inside = src / "ILSVRC" if layout == "kaggle" else None
    if out == src or inside and (out == inside or inside in out.parents):
        raise PrepareError(f"--out {out} would write into the source; choose another folder, e.g. "
                           f"{src.parent / 'imagenet'}")
    t0 = time.time()
    with _exclusive(out):
        o = _Out(out, link if layout == "kaggle" else "copy")
        notes = _prepare_ilsvrc(src, o) if layout == "ilsvrc" else _prepare_kaggle(src, o)
        shutil.rmtree(o.tmp, ignore_errors=True)
    train, val = class_dirs(out / "train"), class_dirs(out / "val")
    no_val = sorted(set(train) - set(val))
    if no_val:
        raise PrepareError(f"{len(no_val)} train class(es) have no val image in the source: {', '.join(no_val[:5])}; "
                           f"DALI numbers classes per split, so train and val must hold the same classes")
    extra = sorted(set(val) - set(train))
    if extra:
        raise PrepareError(f"val images of {len(extra)} class(es) without a train folder: {', '.join(extra[:5])}")
    count = {s: sum(1 for c in (train if s == "train" else val) for _ in os.scandir(out / s / c)) for s in SPLITS}
    return {"out": str(out), "src": str(src), "layout": layout, "classes": len(train),
            "train_images": count["train"], "val_images": count["val"],
            "classes_done_now": o.done_now, "classes_done_before": o.done_before,
            "files": ("extracted" if layout == "ilsvrc" else
                      {"hardlinked": o.linked, "copied": o.copied}),
            "notes": notes, "seconds": round(time.time() - t0, 1),
            "next": f"spnet check-data data.root={out}"}
