"""The C library's allocator, where torch's CPU tensors live: handing freed memory back to the system
(glibc only; elsewhere this does nothing)."""

from __future__ import annotations

import ctypes
import sys


def return_freed_memory() -> None:
    """Hand the memory freed so far back to the system, where the C library keeps it for reuse
    otherwise (glibc's ``malloc_trim``). Between blocks of a sequential conversion, what one block's
    work freed would stay resident: 1 GB or more at the 1B shape."""
    if _libc is not None:
        _libc.malloc_trim(0)


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_libc = _glibc()
