"""Host (CPU) memory: keep freed memory in the process for reuse.

glibc's malloc serves blocks above its mmap threshold (128 KiB, adapting up to 32 MiB) with fresh mmaps and returns
them, and the top of its heap, to the kernel on free. A CPU training step allocates and frees hundreds of MB of
activations, logits and gradients, so every step page-faults all of them in again (and the kernel zeroes each
page): on a 2-core VM, 128k faults and 14% of a bf16 step of bench/train.py's model. Raising the mmap threshold and
disabling trimming keeps those pages mapped and reused: 0 faults per step after the first. The cost: the process
keeps its peak memory (it would reach that peak again on the next step anyway), and the peak can grow where a kept
block is too small for a later request (up to ~10% in bench/train.py's shapes: 1.23 -> 1.34 GB peak RSS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_applied = False


def keep_freed_memory(mmap_threshold: int = 2**30) -> bool:
    """Make glibc malloc keep freed memory for reuse (process-wide; see the module docstring).

    Blocks below `mmap_threshold` come from the heap (older glibc caps the threshold at 32 MiB, which is then
    used instead), and the heap is never trimmed. Returns whether the setting is in effect: False off Linux or
    without glibc (musl, macOS), where nothing changes.
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(_M_MMAP_THRESHOLD, min(mmap_threshold, 2**31 - 1)) or mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)):
        return False
    if not mallopt(_M_TRIM_THRESHOLD, 2**31 - 1):
        return False
    _applied = True
    log.info("host memory: glibc malloc keeps freed memory for reuse (no per-step page faults)")
    return True
