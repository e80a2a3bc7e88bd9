"""The native kernel library for tests: built once per session into the cache (seconds) and
loaded. No compiler: the caller skips; a compiler that fails to build it: the test fails."""
from __future__ import annotations

import functools

import pytest

from pipeserve.kernels import build, library


@functools.cache
def _built() -> str | None:
    """None once built and loaded; the reason to skip where no compiler exists."""
    if build.compiler() is None:
        return "no C++ compiler to build pipeserve's kernels"
    build.build()  # raises BuildFailed (the test fails) when the compiler is there but fails
    library.unavailable_reason.cache_clear()
    reason = library.unavailable_reason()
    assert reason is None, f"built but not loaded: {reason}"
    return None


def require_native_kernels() -> None:
    """Builds and loads the library, or skips the test where there is no compiler."""
    reason = _built()
    if reason:
        pytest.skip(reason)
