"""glibc's allocator, set up for a training loop that frees and reallocates the same large blocks.

XLA:CPU gives each execution of a train step one block for all its temporaries (hundreds of MB)
and frees it when the step ends; torch frees and reallocates its activations every step. glibc
serves each such block with a fresh `mmap` (from the main heap above 32 MB, always from a
thread's own arena), returns it to the kernel on `free`, and the kernel zero-fills every page
again on first touch: a step of the README's bench model then spends a fifth of its CPU time in
page faults. With one arena, no `mmap` and no trimming, freed blocks stay in the heap and the next
step reuses them; the price is that the process keeps its peak heap until it exits, which a
training process reaches anyway.

The arena limit only applies to threads that have not allocated yet, so this runs when
`tnt_jax` or `tnt_torch` is imported, before the framework starts its thread pools.
`TNT_MALLOC=system` leaves glibc's defaults alone. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV = "TNT_MALLOC"
# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
_applied = False


def reuse_freed_blocks() -> bool:
    """Set glibc to keep and reuse freed blocks (module docstring); True when it was set, now or
    by an earlier call. Idempotent and cheap."""
    global _applied
    if _applied:
        return True
    if os.environ.get(ENV, "") == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = all(mallopt(param, value) == 1 for param, value in
                   ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1)))
    return _applied
