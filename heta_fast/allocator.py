"""Keep freed heap memory in the process while the fast path runs (Linux with glibc, CPU).

The batched HVPs allocate and free tensors of tens of MB many times per position. glibc serves
blocks above its mmap threshold (dynamic, at most 32 MB) with fresh pages from the kernel and
gives freed memory at the top of the heap back above its trim threshold, so the same memory is
faulted in and zeroed again and again: on SmolLM2-135M at n = 64, 1.0-1.3 M page faults per batch
of four positions and ~35% of the fast Hessian's time. Raising both thresholds while the work
runs makes the heap reuse its memory (0 faults after the first batch).

The settings are process-wide, so ``retained_heap`` restores fixed thresholds equal to the
ceiling of glibc's dynamic ones on exit and hands the retained memory back (``malloc_trim``;
glibc cannot return a heap top that no longer ends at the program break, which then stays
resident for the process's next allocations). Peak memory is unchanged (the budget bounds it);
only the release is deferred to the end.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import platform
import threading
from collections.abc import Iterator

import torch

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
_DYNAMIC_CEILING = 32 << 20  # glibc's largest dynamic mmap threshold on 64-bit systems

_lock = threading.Lock()
_depth = 0


@functools.cache  # libc_ver() reads the interpreter's binary: once per process
def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextlib.contextmanager
def retained_heap(enabled: bool = True, device: torch.device | None = None) -> Iterator[bool]:
    """Within the block glibc keeps freed memory for reuse; yields whether the setting applies.

    device: where the work's tensors live (None: the CPU); the host heap only matters for CPU work.
    Nested and concurrent uses are counted: the thresholds are restored when the last one exits.
    A no-op (yields False) where ``enabled`` is False, the device is not the CPU or the C library
    is not glibc.
    """
    global _depth
    on_cpu = device is None or torch.device(device).type == "cpu"
    libc = _glibc() if enabled and on_cpu else None
    if libc is None:
        yield False
        return
    with _lock:
        if _depth == 0:
            libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(1 << 30))
            libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(-1))  # size_t max: never trim
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(_DYNAMIC_CEILING))
                libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2 * _DYNAMIC_CEILING))
                libc.malloc_trim(ctypes.c_size_t(0))
