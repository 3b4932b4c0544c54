"""The ImageNet folder layout ``root/{train,val}/<wnid>/<image>``: class folders and the image files in them.

``IMAGE_EXTS`` is the one list of file extensions the loaders read (what DALI's file reader picks up).
"""
from __future__ import annotations

import os
from pathlib import Path

SPLITS = ("train", "val")
# file extensions DALI's file reader picks up in a class folder (case-insensitive), measured on DALI 2.4
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".pnm", ".ppm", ".pgm", ".pbm", ".jp2",
                        ".webp", ".flac", ".ogg", ".wav"})
SHOW = 5  # how many names an error message lists


def class_dirs(split_dir: str | Path) -> list[str]:
    """Every sub-folder of ``split_dir``, sorted — exactly the folders DALI's file reader turns into labels
    0..n-1 (hidden and empty folders included)."""
    with os.scandir(split_dir) as it:
        return sorted(e.name for e in it if e.is_dir())


def image_files(class_dir: str | Path) -> tuple[list[str], list[str], list[str]]:
    """(image files the loaders read, other files they ignore, sub-folders they ignore) of one class folder,
    each sorted."""
    images, other, subdirs = [], [], []
    with os.scandir(class_dir) as it:
        for e in it:
            if e.is_dir():
                subdirs.append(e.name)
            elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTS:
                images.append(e.name)
            else:
                other.append(e.name)
    return sorted(images), sorted(other), sorted(subdirs)


def name_list(items: list[str], show: int = SHOW) -> str:
    """``a, b, c and 4 more``: the first ``show`` names of a list for a one-line message."""
    head = ", ".join(items[:show])
    return head + (f" and {len(items) - show} more" if len(items) > show else "")
