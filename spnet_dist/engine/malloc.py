"""Keep freed memory inside the process on CPU runs (glibc ``mallopt``).

A training step frees and re-allocates the same large activation tensors every iteration. With glibc's defaults,
blocks of a few MiB and more are ``mmap``-ed and returned to the kernel when freed, so every step pays page faults
for memory it just gave back. Raising the mmap threshold to its maximum (32 MiB) and the trim threshold to 1 GiB
keeps that memory in the heap for re-use: on CPU a ResNet-50 SP-Net step gets ~12 % faster and a ConvNet-AIG one
~10 % (``tools/bench_step.py``, BENCHMARKS.md). Memory that was freed is not returned to the OS until the process
ends, which a training process does not need. No-op on non-glibc systems.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's cap on 64-bit systems
TRIM_THRESHOLD = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Apply the thresholds above; True when glibc accepted both."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.warning("mallopt refused the malloc thresholds; CPU steps keep glibc's default allocation behaviour")
    return ok
