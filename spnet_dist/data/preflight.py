"""The data pre-flight: one pass per start that checks the dataset and plans what the loaders read.

``plan_data(cfg, world)`` lists each split once (through its cached index, so a warm start costs a ``stat`` per
class folder), applies ``data.scan`` / ``data.on_corrupt`` and checks what would break training: the folder
layout, train/val class agreement, hidden or empty class folders, an explicit ``model.num_classes`` (``auto``:
the class folders decide, ``resolve_num_classes``) and one step of ``trainer.batch_size`` x ``world`` images. It
raises one FileNotFoundError or DataError naming the problem, or returns the ``DataPlan`` that train, submit, eval
and the loaders use from then on.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..cfgtools import cfg_get
from . import files as listing
from .files import SPLITS, name_list
from .index import index_path, split_index
from .options import ON_CORRUPT_CHOICES, SCAN_CHOICES

log = logging.getLogger("spnet.data")


AUTO = "auto"  # model.num_classes: the number of class folders in train/


class DataError(ValueError):
    """A problem with the dataset on disk; the message names the folder or file and what to do."""


def num_classes_setting(value: Any) -> int | None:
    """``model.num_classes`` as configured: None for ``auto`` or unset (the class folders of train/ decide), else a
    positive int; ValueError for anything else."""
    if value is None or value == AUTO:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"model.num_classes={value!r} is not valid; give a positive integer or {AUTO} (the number "
                         f"of class folders in data.root/train/)")
    return value


def resolve_num_classes(cfg: Any, plan: "DataPlan") -> int:
    """Write the data's class count into ``cfg.model.num_classes`` when it is ``auto`` — before the model is built,
    so the checkpoint's saved config and the MLflow params hold the number; returns the count."""
    if "model" in cfg and cfg.model.get("num_classes") == AUTO:
        cfg.model.num_classes = len(plan.classes)
    return len(plan.classes)


@dataclass(frozen=True)
class SplitPlan:
    """One split as the loaders read it."""

    name: str
    dir: Path
    files: tuple[str, ...]  # usable ``<class>/<file>``: class folders in label order, then file names sorted
    excluded: dict[str, str] = field(default_factory=dict)  # ``<class>/<file>`` -> why it is left out


@dataclass(frozen=True)
class DataPlan:
    """What one start reads: the classes (label = position), each split's usable files and, for ``world`` ranks,
    each rank's shard size (DALI's split of a file list)."""

    root: Path
    classes: tuple[str, ...]
    train: SplitPlan
    val: SplitPlan
    world: int
    shard_sizes: dict[str, tuple[int, ...]]  # split -> images of rank 0..world-1

    def split(self, name: str) -> SplitPlan:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; the data has {', '.join(SPLITS)}")
        return self.train if name == "train" else self.val

    def labels(self, files: Sequence[str]) -> tuple[int, ...]:
        """Label of each ``<class>/<file>``: the position of its class in ``classes`` (every backend's rule)."""
        label = {c: i for i, c in enumerate(self.classes)}
        return tuple(label[f.split("/", 1)[0]] for f in files)


def shard_sizes(n: int, world: int) -> tuple[int, ...]:
    """Images per shard when ``n`` files are split over ``world`` shards (rank i reads [n*i//world, n*(i+1)//world))."""
    return tuple(n * (i + 1) // world - n * i // world for i in range(world))


def _layout_error(root: Path, d: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"data.root={str(root)!r}: no class folders in {d}; expected {root}/train/<wnid>/*.JPEG and "
        f"{root}/val/<wnid>/*.JPEG (make a tiny one with `spnet make-tiny-imagenet {root}`, or prepare "
        f"ImageNet with `spnet prepare-imagenet`)")


def _classes(root: Path) -> tuple[dict[str, list[str]], list[str]]:
    """Each split's class folders (listed once) and the class list; fails when a split has none or they differ."""
    per_split = {}
    for split in SPLITS:
        d = root / split
        per_split[split] = listing.class_dirs(d) if d.is_dir() else []
        if not per_split[split]:
            raise _layout_error(root, d)
    train, val = per_split["train"], per_split["val"]
    if train == val:
        return per_split, train
    missing = sorted(set(train) - set(val))
    extra = sorted(set(val) - set(train))
    parts = []
    if missing:
        parts.append(f"val has no folder for {len(missing)} of the {len(train)} train classes ({name_list(missing)})")
    if extra:
        parts.append(f"val has {len(extra)} class folder(s) that train lacks ({name_list(extra)})")
    raise DataError(f"data.root={str(root)!r}: {'; '.join(parts)}. DALI numbers the class folders of each split "
                    f"separately, so labels would not match; make both splits hold the same <wnid> folders "
                    f"(`spnet prepare-imagenet` does), then run `spnet check-data data.root={root}`")


_warned: set[tuple] = set()


def _split_plan(split_dir: Path, classes: list[str], scan: str, on_corrupt: str) -> SplitPlan:
    """The usable files of a split by ``data.scan`` / ``data.on_corrupt``: ``scan=off`` uses every listed file;
    otherwise the cached index at that level, where ``fail`` raises DataError naming the undecodable files and
    ``skip`` leaves them out with a warning naming them."""
    idx = split_index(split_dir, scan if scan != "off" else "list", classes=classes)
    bad = dict(idx["bad"]) if scan != "off" else {}
    if bad:
        shown = "; ".join(f"{split_dir / k}: {v}" for k, v in sorted(bad.items())[:listing.SHOW])
        more = (f"; and {len(bad) - listing.SHOW} more (all listed in {index_path(split_dir)})"
                if len(bad) > listing.SHOW else "")
        if on_corrupt == "fail":
            raise DataError(f"{len(bad)} undecodable image file(s) in {split_dir} (data.on_corrupt=fail): {shown}"
                            f"{more}. Replace or delete them, or set data.on_corrupt=skip to train without them")
        key = (str(split_dir), idx["fingerprint"], tuple(sorted(bad)))
        if os.environ.get("RANK", "0") == "0" and key not in _warned:  # every rank computes the same list
            _warned.add(key)
            log.warning("data: leaving out %d undecodable image file(s) of %s (data.on_corrupt=skip): %s%s",
                        len(bad), split_dir, shown, more)
    usable = tuple(f for c in classes for f in (f"{c}/{n}" for n in idx["files"][c]) if f not in bad)
    return SplitPlan(split_dir.name, split_dir, usable, bad)


def plan_data(cfg: Any, world: int, for_training: bool = True, scan: str | None = None) -> DataPlan:
    """Check ``cfg.data.root`` for a start with ``world`` ranks and plan what the loaders read (see the module
    docstring). ``for_training=False`` (evaluation) skips the batch-size check; ``scan`` overrides ``data.scan``
    (``off``: only list, open no file — `spnet submit` on a login node)."""
    root = Path(str(cfg.data.root))
    scan = str(scan or cfg_get(cfg.data, "scan", "quick"))
    on_corrupt = str(cfg_get(cfg.data, "on_corrupt", "skip"))
    if scan not in SCAN_CHOICES:
        raise DataError(f"data.scan={scan!r} is not valid; choose one of {', '.join(SCAN_CHOICES)}")
    if on_corrupt not in ON_CORRUPT_CHOICES:
        raise DataError(f"data.on_corrupt={on_corrupt!r} is not valid; choose one of {', '.join(ON_CORRUPT_CHOICES)}")
    per_split, classes = _classes(root)
    splits = {s: _split_plan(root / s, per_split[s], scan, on_corrupt) for s in SPLITS}
    hidden = [c for c in classes if c.startswith(".")]
    if hidden:
        raise DataError(f"data.root={str(root)!r}: hidden folder(s) {name_list(hidden)} in train/ and val/ are taken "
                        f"as classes by DALI; move them out of the dataset")
    present = {s: {f.split("/", 1)[0] for f in p.files} for s, p in splits.items()}
    empty = [f"{s}/{c}" for s in SPLITS for c in classes if c not in present[s]]
    if empty:
        raise DataError(f"data.root={str(root)!r}: {len(empty)} class folder(s) without usable images: "
                        f"{name_list(empty)}; every class needs train and val images (re-run `spnet prepare-imagenet`"
                        f", or `spnet check-data data.root={root}` for details)")
    num_classes = num_classes_setting(cfg.model.get("num_classes")) if "model" in cfg else None
    if num_classes is not None and num_classes != len(classes):
        raise DataError(f"model.num_classes={num_classes} but data.root={str(root)!r} has {len(classes)} classes "
                        f"(folders in train/); set model.num_classes={len(classes)}")
    world = max(1, int(world))
    images = len(splits["train"].files)
    batch_size = cfg.trainer.get("batch_size") if for_training and "trainer" in cfg else None
    if batch_size and images // world < int(batch_size):
        raise DataError(f"trainer.batch_size={batch_size} is too large: {world} rank(s) x {batch_size} = "
                        f"{world * int(batch_size)} images per step, but data.root={str(root)!r} has "
                        f"{images} usable training images, so an epoch would have no step; use "
                        f"trainer.batch_size<={max(1, images // world)}")
    return DataPlan(root, tuple(classes), splits["train"], splits["val"], world,
                    {s: shard_sizes(len(p.files), world) for s, p in splits.items()})
