"""Gives the C heap's free pages back to the operating system after a load or an unload.

Loading allocates and frees hundreds of megabytes of transient tensors (dtype conversions,
the storage a module is built with before the checkpoint's tensors take its place, layout
changes). glibc serves tensors under its mmap threshold, which rises up to 32 MiB as large
blocks are freed, from the heap, and keeps freed heap pages resident: measured on the
speech-only server (Whisper tiny.en), 87 MiB stayed resident after the load until
malloc_trim returned them. A process whose C library is not glibc skips this.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def release_free_heap() -> bool:
    """Returns the heap's free pages to the system; -> whether the C library could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
