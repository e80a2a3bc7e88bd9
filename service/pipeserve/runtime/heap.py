"""The C heap's free pages go back to the operating system: after a load or an unload, and as
large blocks are freed during calls.

Loading allocates and frees hundreds of megabytes of transient tensors (dtype conversions,
layout changes), and every call allocates and frees activations of a few MB (Whisper's
encoder: 2-9 MB per layer and window). glibc serves a block under its mmap threshold from the
heap and keeps the freed heap pages resident; the threshold starts at 128 KiB but rises to
the size of every mmapped block freed (up to 32 MiB), so after the first call every
activation lives on the heap and its pages stay: measured on the speech-only server
(Whisper tiny.en), +95 MiB resident after the first transcription, and 87 MiB after the load
until malloc_trim returned them.

`limit_heap_slack` fixes the threshold (which also stops its rise): blocks of
`mmap_threshold` bytes or more are mapped and unmapped, so their pages leave with them; and
lowers the trim threshold, so the heap's free top goes back as it frees. A process whose C
library is not glibc skips both.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt parameters (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # glibc's, not every C library's
        return libc
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune or trim
        return None


def release_free_heap() -> bool:
    """Returns the heap's free pages to the system; -> whether the C library could."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


class _MallInfo2(ctypes.Structure):  # glibc >= 2.33 struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def heap_usage() -> dict[str, int] | None:
    """The C heap, process-wide (models, activations, the interpreter and libraries alike):
    "in_use" bytes allocated (heap chunks and mapped blocks), "free" bytes the heap holds
    freed but not yet returned (the allocator's slack; malloc_trim returns their pages, so
    only part of it is resident). None where the C library has no mallinfo2 (not glibc 2.33+)."""
    libc = _libc()
    mallinfo2 = getattr(libc, "mallinfo2", None) if libc is not None else None
    if mallinfo2 is None:
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return {"in_use": info.uordblks + info.hblkhd, "free": info.fordblks}


def limit_heap_slack(mmap_threshold: int) -> bool:
    """Blocks of `mmap_threshold` bytes or more are mapped (their pages return when freed),
    and the heap trims its free top past 4 x that; 0 leaves glibc's adaptive defaults.
    -> whether the thresholds were set."""
    libc = _libc()
    if libc is None or mmap_threshold <= 0:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold))
                and libc.mallopt(M_TRIM_THRESHOLD, 4 * int(mmap_threshold)))
