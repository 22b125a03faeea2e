"""The C library's allocator, where torch's CPU tensors live: handing freed memory back to the
system, or keeping it for reuse while a loop allocates the same sizes over and over (glibc only;
elsewhere this does nothing)."""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt(3) parameters and glibc's defaults
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
DEFAULT_TRIM_THRESHOLD = DEFAULT_TOP_PAD = DEFAULT_MMAP_THRESHOLD = 128 * 1024
MAX_MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit systems
HELD_TRIM_THRESHOLD = 1 << 30
HELD_TOP_PAD = 64 << 20


def return_freed_memory() -> None:
    """Hand the memory freed so far back to the system, where the C library keeps it for reuse
    otherwise (glibc's ``malloc_trim``). Between blocks of a sequential conversion, what one block's
    work freed would stay resident: 1 GB or more at the 1B shape."""
    if _libc is not None:
        _libc.malloc_trim(0)


@contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Within the block, keep freed memory in the process for the next allocation of the same size.

    A training step on CPU allocates and frees the same large tensors every step (activations kept
    for the backward pass, a chunk of logits). By default glibc maps each one of more than 128 KB
    afresh and unmaps it when freed, or gives the freed top of its heap back, so every step the
    kernel faults in and zeroes those pages again. Here blocks up to 32 MB (the most glibc allows)
    come from the heap, and up to 1 GB of freed heap stays mapped: a distillation step of
    SmolLM2-135M at 256 experts (4 x 512 tokens, 2 cores) took 7.5-8.4 s instead of 10.3 s.
    (PyTorch's CPU tuning guide suggests jemalloc or tcmalloc, which keep freed memory, for the
    same reason.)

    Afterwards the freed memory goes back to the system and the three settings to glibc's defaults
    (fixed ones: once a program sets any of them, glibc no longer adapts its mapping threshold).
    """
    if _libc is None:
        yield
        return
    _libc.mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD)
    _libc.mallopt(M_TRIM_THRESHOLD, HELD_TRIM_THRESHOLD)
    _libc.mallopt(M_TOP_PAD, HELD_TOP_PAD)
    try:
        yield
    finally:
        _libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        _libc.mallopt(M_TOP_PAD, DEFAULT_TOP_PAD)
        _libc.mallopt(M_MMAP_THRESHOLD, DEFAULT_MMAP_THRESHOLD)
        _libc.malloc_trim(0)


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


_libc = _glibc()
