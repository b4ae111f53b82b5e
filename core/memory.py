"""Give freed tensor memory back to the operating system.

glibc serves an allocation from its heap unless it is larger than a threshold that it raises, up to
32 MiB, every time a large block is freed; freed heap memory then stays with the process. Training and
evaluating with half-precision weights casts each layer's weight for one call, frees it and casts the
next, blocks of a few MiB to tens of MiB, so the heap grows to hold them all: on a 1.1 B base the client
held 1.6 GB more than it used after a forward and backward pass, 0.45 GB with a fixed 1 MiB threshold
(three training steps took 90 s against 84 s, on a loaded machine). The fixed threshold costs small
models more (each activation of a few MiB gets fresh pages: the demo model's steps ran up to 2x slower),
so offsite.precision.prepare sets it only for models with large half-precision weights.
MALLOC_MMAP_THRESHOLD_ in the environment decides instead, from outside.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

M_MMAP_THRESHOLD = -3       # glibc's mallopt parameter
THRESHOLD_BYTES = 1 << 20   # allocations above 1 MiB get pages of their own, returned when freed


@functools.lru_cache(maxsize=1)  # once per process: finding libc runs ldconfig
def return_freed_memory() -> bool:
    """Set glibc's mmap threshold to 1 MiB (fixed) unless the environment set one; False where there is no
    glibc (musl, macOS): their allocators return large blocks anyway."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
