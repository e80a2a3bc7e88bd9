"""Loads the built kernel library once per process, or says why it cannot.

Loading never compiles (kernels/build.py does, at setup): a missing library, one built for
another source / torch / CPU (its cache key differs), or one that fails to load leaves the
callers on their torch path, and the reason is logged once.
"""
from __future__ import annotations

import functools
import logging

import torch

from . import build

log = logging.getLogger(__name__)
_loaded: set[str] = set()  # paths this process loaded (a library loads once per process)


@functools.cache
def unavailable_reason() -> str | None:
    """None once the library is loaded into torch.ops.pipeserve, else why not (logged once)."""
    reason = _load()
    if reason:
        log.info("native grid kernels not used: %s", reason)
    return reason


def _load() -> str | None:
    try:
        path = build.library_path()
    except OSError as exc:
        return f"its source is unreadable ({exc})"
    if not path.exists():
        return f"not built for this source, torch and CPU (run `python -m pipeserve.kernels.build`; expected {path})"
    if str(path) in _loaded:
        return None
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as exc:
        return f"{path} does not load: {exc}"
    _loaded.add(str(path))
    return None


def available() -> bool:
    """The native operators are loaded (loading them on first call)."""
    return unavailable_reason() is None


@functools.cache
def isa() -> str:
    """Which path the loaded library computes with: "avx512" or "portable" (one library a process)."""
    return torch.ops.pipeserve.grid_kernel_isa()


def max_in_features() -> int:
    """The largest K the kernel takes (its per-thread buffer holds 4 x K floats)."""
    return torch.ops.pipeserve.grid_max_k()
