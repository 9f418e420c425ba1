"""Keep freed memory in the process (glibc malloc), so eager CPU inference and training stop page-faulting.

Eager PyTorch on the CPU allocates every activation (and, in training, every gradient) fresh.  glibc hands
large blocks back to the kernel when they are freed (mmap threshold, heap trimming), so the next pass
page-faults the same memory in again.  Measured here on MobileNetV3-Large at batch 32 (one thread,
`resource.getrusage`): ~150-180k minor page faults per forward pass and about half the CPU time spent
in the kernel, for ours, torchvision's and timm's network alike.  With `keep_freed_memory()` the
faults drop to zero and the pass takes about half the time.  A training step on CPU gains the same way
(`benchmarks/train_speed.py` measures it with and without, side by side).  ONNX Runtime has its own arena
and does not need this.

The price is that the process keeps its peak memory instead of returning it to the system, as CUDA's
caching allocator does on the GPU: fine for a training, inference or benchmark process, so `train` (config
key `keep_freed_memory`, on by default, CPU only), `predict --engine torch` and `bench --keep-freed-memory`
use it; a library must not change it behind its user's back, so nothing calls it on import.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 1 << 30, top_pad: int = 64 << 20) -> bool:
    """Tell glibc malloc to serve blocks up to `mmap_threshold` from the heap and never trim it.

    Returns False (and changes nothing) where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        logger.debug("no glibc mallopt here; allocator left as it is")
        return False
    settings = ((M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, top_pad))
    applied = all(mallopt(parameter, value) == 1 for parameter, value in settings)
    logger.debug("glibc malloc keeps freed memory: %s", applied)
    return applied
