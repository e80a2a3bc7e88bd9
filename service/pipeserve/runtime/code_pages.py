"""Code pages that only start-up ran leave the resident set once the models are loaded.

Importing torch runs the static initialisers of libtorch (thousands of operator
registrations) and a load runs its conversion and packing kernels: code executed once, whose
pages stay mapped and counted in the process's resident memory (VmRSS) until the kernel needs
the memory. On the speech-only server (Whisper tiny.en) 73 MiB of libtorch_cpu's code was
resident after a few transcriptions, of which the transcriptions use about a third.

`release_code_pages` tells the kernel (madvise MADV_DONTNEED) that the process no longer needs
the pages of its executable file mappings: they leave the resident set at once, and a page
that runs again is mapped back from the page cache on its first use (a minor fault, with the
kernel's fault-around mapping its neighbours too; no disk read while the file stays cached).
What this saves is resident set size (VmRSS, RssFile, PSS), not physical memory: the pages
stay in the page cache, which a cgroup's memory accounting still charges, as it would after
the kernel reclaimed them under pressure. Only clean private code mappings are touched: a
mapping with anonymous pages (text relocations, debugger breakpoints) would lose them, so it
is skipped, as are deleted files and every writable or data mapping (weights mapped from
model.bin or safetensors stay resident). Linux only; elsewhere it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
from pathlib import Path

MADV_DONTNEED = 4
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")


@functools.cache
def _madvise():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def clean_code_mappings(smaps: str) -> list[tuple[int, int]]:
    """(start, end) of the executable private file mappings in /proc/<pid>/smaps text that hold
    no anonymous (modified) page."""
    mappings: list[list] = []
    for line in smaps.splitlines():
        match = _MAPPING.match(line)
        if match:
            start, end, perms, path = match.groups()
            code = perms == "r-xp" and path.startswith("/") and not path.endswith("(deleted)")
            mappings.append([int(start, 16), int(end, 16), code])
        elif line.startswith("Anonymous:") and mappings and int(line.split()[1]) > 0:
            mappings[-1][2] = False
    return [(start, end) for start, end, code in mappings if code]


def release_code_pages(smaps_path: Path = Path("/proc/self/smaps")) -> int:
    """Drops this process's clean code pages from its resident set; -> bytes of the mappings
    advised (their resident part is what leaves), 0 where the system has no /proc or madvise."""
    madvise = _madvise()
    try:
        smaps = smaps_path.read_text()
    except OSError:
        return 0
    if madvise is None:
        return 0
    released = 0
    for start, end in clean_code_mappings(smaps):
        if madvise(start, end - start, MADV_DONTNEED) == 0:  # EINVAL (locked pages): left as they are
            released += end - start
    return released
