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

torch.set_num_threads is per thread here (the compute lane's thread sets its own count,
scheduling/compute.py); switching costs ~0.1 us.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")


class SerialSection:
    """`with SerialSection(small):` runs its body on one thread when `small` and the calling
    thread has a team; `team(fn, *args)` runs fn with the team again inside it (a GEMM between
    small operators). The thread count is restored on the way out, errors included."""

    __slots__ = ("active", "threads")

    def __init__(self, small: bool):
        self.threads = torch.get_num_threads()
        self.active = small and self.threads > 1

    def __enter__(self) -> "SerialSection":
        if self.active:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            torch.set_num_threads(self.threads)

    def team(self, fn: Callable[..., T], *args) -> T:
        if not self.active:
            return fn(*args)
        torch.set_num_threads(self.threads)
        try:
            return fn(*args)
        finally:
            torch.set_num_threads(1)
