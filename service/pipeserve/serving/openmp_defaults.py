"""OpenMP settings the server applies before torch loads (benchmarks apply them too, so they
measure what production runs).

torch's OpenMP runtime (libgomp) reads them once, when it loads. Idle OpenMP workers spin for a bounded time (GOMP_SPINCOUNT pause instructions, ~0.1 ms
here) before sleeping. libgomp's default spins ~30x longer: the server's threads (event
loop, executor workers, the generation engine) and other processes share the cores, and
long-spinning idle workers took CPU from the threads doing the work (token generation ran
~10-50x slower on a loaded 2-core machine). Sleeping at once (OMP_WAIT_POLICY=PASSIVE) fixes
that but wakes the workers for every operator: a Whisper decoding step, ~40 small parallel
regions, took 6.0 ms instead of 3.3 ms. An operator's own settings win.
"""
from __future__ import annotations

import os

SPIN_COUNT = "10000"


def apply_openmp_defaults() -> None:
    """Must run before torch is imported; settings already in the environment win."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
