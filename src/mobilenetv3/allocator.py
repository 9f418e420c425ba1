"""Keep freed memory in the process (glibc malloc), so eager CPU inference and training stop page-faulting.

Eager PyTorch on the CPU allocates every activation (and, in training, every gradient) fresh.  glibc hands
large blocks back to the kernel when they are freed (mmap threshold, heap trimming), so the next pass
page-faults the same memory in again, for ours, torchvision's and timm's network alike (count them with
`resource.getrusage`'s minor faults).  With `keep_freed_memory()` those faults go away.  Criterion: a CPU
training run and an eager forward pass faster with it than without (`benchmarks/train_speed.py` times training
with and without, side by side; `benchmarks/eager_speed.py --keep-freed-memory` the forward pass).  ONNX Runtime
has its own arena and does not need this.

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
