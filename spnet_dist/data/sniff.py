"""Inspect image files: a structural sniff (first 16 bytes, last 4 KiB) or a full PIL decode.

The sniff catches empty files, non-images, GIFs (DALI cannot decode them), JPEGs without an end-of-image marker and
PNGs without IEND (truncated); suspicious files are confirmed by a full PIL decode. A full decode also notes CMYK
JPEGs and PNG data in .JPEG files, which DALI decodes correctly.

What DALI 2.4 (CPU decoder) does with bad files, as measured: truncated JPEG/PNG, 0-byte files, text or GIF
data -> a "Critical error in pipeline" that kills the pipeline (the error names the file for truncated JPEG
bodies and empty files, but only says ``nvImageCodec failure: '#3'`` for a truncated header, a truncated PNG or
non-image data). CMYK JPEGs, grayscale JPEGs and PNG data named .JPEG decode to correct RGB (identical to PIL).
A JPEG with corrupted (zeroed) entropy data decodes without error to a damaged picture, in DALI and PIL alike;
no check here can tell it from a real picture (its label is still right).
"""
from __future__ import annotations

import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..osutil import usable_cores

log = logging.getLogger("spnet.data")
TAIL = 4096


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


def inspect_folders(jobs: list[tuple[str, list[str], bool]], decode: bool,
                    workers: int | None = None) -> list[tuple[dict[str, str], dict[str, str]]]:
    """``(bad, notes)`` per ``(class folder, file names, decode)`` job: threads for sniffing (I/O-bound),
    processes for a full decode of many files (PIL holds the GIL)."""
    if not jobs:
        return []
    cores = usable_cores()
    files = sum(len(j[1]) for j in jobs)
    if decode and files > 400 and (workers or cores) > 1:
        import multiprocessing
        import sys
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        # fork is cheap but unsafe once torch/DALI started threads
        heavy = any(m in sys.modules for m in ("torch", "nvidia.dali"))
        ctx = multiprocessing.get_context("spawn" if heavy else "fork")
        try:
            with ProcessPoolExecutor(workers or cores, mp_context=ctx) as ex:
                return list(ex.map(_inspect_class, jobs, chunksize=max(1, len(jobs) // (8 * cores))))
        except (BrokenProcessPool, OSError) as err:  # e.g. spawn cannot re-import an interactive __main__
            log.warning("data: decoding in worker processes failed (%s); decoding in threads instead", err)
    with ThreadPoolExecutor(workers or min(32, 4 * cores)) as ex:
        return list(ex.map(_inspect_class, jobs))
