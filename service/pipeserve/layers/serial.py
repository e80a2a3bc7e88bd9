"""Small operators on the calling thread alone, not split over torch's intra-op team.

ATen splits an elementwise operator over the OpenMP team from 32768 elements, softmax from two
rows (its grain is 0), and MKL's batched GEMM by batch entry. On the small tensors of a
decoding step (one row per sequence) each such parallel section costs more than its work: a
fork and a join, and where the cores are busy (other processes, the server's own gRPC and
tokenizer threads) the join waits until the sleeping worker is scheduled again, hundreds of
microseconds. Measured on our shared 2-core Xeon (load 2-4, 2 intra-op threads, best of 5
interleaved): one-row decoding attention 268 -> 9 us per layer, 16 rows at 60 keys 852 -> 69 us;
Gemma 3 270M's int8 layers at 16 rows 189 -> 106 ms per step with the per-row quantization ops
on one thread (the int8 GEMMs keep the team). Where the work is large enough the team pays
(16 rows at 512 keys: 540 us with two threads, 1047 with one), and on a quiet machine the
fork is cheap (those int8 layers at 16 rows: 44.4 ms serial against 42.8 split), so each
caller passes its own bound.

The switch is OpenMP's own omp_set_num_threads (libgomp, the library torch loaded), which
sets the calling thread's team size only. torch.set_num_threads would also become the default
of every thread started later, and the compute lane (scheduling/compute.py) relies on that
default staying 1 off the lane: a section restoring the lane's 2 through torch made later
threads start teams of their own. Where torch runs without libgomp (another OpenMP runtime,
no /proc), sections do not switch. Switching costs ~0.1 us.
"""
from __future__ import annotations

import ctypes
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def _openmp_set_num_threads() -> Callable[[int], None] | None:
    """libgomp's omp_set_num_threads from the copy this process loaded (torch's), or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line and "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            function = ctypes.CDLL(path).omp_set_num_threads
        except (OSError, AttributeError):
            continue
        function.argtypes, function.restype = [ctypes.c_int], None
        return function
    return None


_set_team = _openmp_set_num_threads()


class SerialSection:
    """`with SerialSection(small):` runs its body on one thread when `small` and the calling
    thread has a team; `team(fn, *args)` runs fn with the team again inside it (a GEMM between
    small operators). The thread count is restored on the way out, errors included."""

    __slots__ = ("active", "threads")

    def __init__(self, small: bool):
        self.threads = torch.get_num_threads()  # this thread's team (omp_get_max_threads)
        self.active = small and self.threads > 1 and _set_team is not None

    def __enter__(self) -> "SerialSection":
        if self.active:
            _set_team(1)
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            _set_team(self.threads)

    def team(self, fn: Callable[..., T], *args) -> T:
        if not self.active:
            return fn(*args)
        _set_team(self.threads)
        try:
            return fn(*args)
        finally:
            _set_team(1)
