"""Keep freed memory in the process on CPU: glibc's malloc otherwise makes every training step page-fault.

A training step allocates and frees the same large blocks (activations, gradients) again and again.  glibc
serves blocks above its mmap threshold (128 KiB, raised dynamically up to 32 MiB) with fresh `mmap` calls and
gives the top of the heap back to the OS past its trim threshold, so each step starts on pages the kernel must
fault in and zero again.  Raising both thresholds once (what `MALLOC_MMAP_THRESHOLD_` and
`MALLOC_TRIM_THRESHOLD_` do from the environment, and what PyTorch's CPU tuning guide gets from jemalloc or
tcmalloc) keeps those pages: the process holds its peak memory until it exits, as CUDA's caching allocator
does on the GPU.  `benchmarks/cpu_memory.py` measures the step time with and without it side by side.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: blocks below this come from the heap (reused) instead of a fresh mmap; Debian 12's glibc 2.36 takes 1 GiB,
#: a glibc that refuses more than its 64-bit dynamic maximum gets 32 MiB (the fallback)
MMAP_THRESHOLDS = (1 << 30, 32 << 20)
#: the free top of the heap is given back to the OS only past this (mallopt takes a C int)
TRIM_THRESHOLD = 2**31 - 1


def keep_freed_cpu_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (and the workers it forks later).

    Returns whether they were set: False (and nothing changes) on other C libraries and systems.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: musl has a mallopt that does nothing
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not any(mallopt(M_MMAP_THRESHOLD, threshold) == 1 for threshold in MMAP_THRESHOLDS):
        return False
    if mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return False
    logger.debug("glibc malloc: freed memory is kept in the process (mmap and trim thresholds raised)")
    return True
