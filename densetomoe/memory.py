"""The C library's allocator, where torch's CPU tensors live: when freed memory goes back to the
system, and when it stays for reuse (glibc only; elsewhere these do nothing)."""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit systems


def return_freed_memory() -> None:
    """Hand the memory freed so far back to the system, where the C library keeps it for reuse
    otherwise (glibc's ``malloc_trim``). Between blocks of a sequential conversion, what one block's
    work freed would stay resident: 1 GB or more at the 1B shape."""
    if _libc is not None:
        _libc.malloc_trim(0)


def reuse_freed_memory() -> None:
    """Keep freed memory for reuse, for work that allocates the same tensors over and over (training).

    By default glibc serves each allocation above a threshold (128 KB, rising to at most 32 MB as
    large blocks are freed) with its own ``mmap`` and returns it to the system when freed, so every
    training step maps its activations anew and the kernel zero-fills them page by page: in a
    30-minute SmolLM2 distillation, 450 million page faults and a fifth of the CPU time in the
    kernel. Here allocations up to 32 MB come from the heap, and freed memory stays there (memory
    above what the largest step needs is not given back until :func:`return_freed_memory`).
    """
    if _libc is not None:
        _libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
        _libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


_libc = _glibc()
