"""Process-level CPU tuning: keep freed tensor memory in the C heap instead of returning it to the kernel.

glibc serves blocks over its mmap threshold (128 KiB, rising to 32 MiB at most) with a fresh mmap, and gives them
back with munmap when freed. A tensor of a few megabytes then costs one page fault per 4 KiB page every time it is
allocated, on every call: on the 2-core development VM `F.relu` of an 80 x 32 x 84 x 84 activation takes 21 ms, of
which 19 ms are page faults (`relu_` in place: 2.4 ms), and a mini-ImageNet adapt + predict call 396 -> 251 ms
once the allocator keeps its memory. This is the effect jemalloc/tcmalloc are preloaded for in CPU inference
guides; `mallopt` gets it from glibc without a preload:

- M_MMAP_MAX = 0: large blocks come from the heap too (glibc still falls back to mmap where the heap cannot grow);
- M_TRIM_THRESHOLD = 1 GiB: freed memory at the top of the heap is kept for the next call, up to 1 GiB;
- M_ARENA_MAX = 1: threads (the server's engine thread) share that heap; a thread's own arena hands blocks over
  64 MiB to mmap regardless (measured: no gain in a worker thread without it, 21 -> 3.6 ms with it). Call this
  before starting the threads that allocate tensors: a thread that already has an arena keeps it.

The process keeps its peak heap (up to 1 GiB above what is live) instead of returning it: the trade a long-lived
server or benchmark wants. Set FASTADAPT_MALLOC_TUNING=0 to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TRIM_THRESHOLD_BYTES = 1 << 30
ENV = "FASTADAPT_MALLOC_TUNING"

_state: str | None = None


def tune_cpu_allocator() -> str:
    """Apply the glibc settings above once per process; returns what was done, in words (for logs and reports).

    Idempotent; does nothing off glibc, or with FASTADAPT_MALLOC_TUNING=0."""
    global _state
    if _state is not None:
        return _state
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        _state = f"allocator untouched ({ENV}=0)"
        return _state
    libc_name, _ = platform.libc_ver()
    if platform.system() != "Linux" or libc_name != "glibc":
        _state = f"allocator untouched (not glibc: {platform.system()} {libc_name or 'unknown libc'})"
        return _state
    try:
        libc = ctypes.CDLL("libc.so.6")
        settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
        ok = all(libc.mallopt(param, value) == 1 for param, value in settings)
    except (OSError, AttributeError) as exc:
        _state = f"allocator untouched (mallopt unavailable: {exc})"
        return _state
    _state = ("glibc malloc keeps freed memory (mallopt M_ARENA_MAX=1, M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 GiB)" if ok
              else "allocator untouched (mallopt refused the settings)")
    return _state


def allocator_state() -> str:
    """What tune_cpu_allocator did in this process, or that it was not called."""
    return _state or "allocator untouched (not requested)"


__all__ = ["tune_cpu_allocator", "allocator_state", "ENV"]
