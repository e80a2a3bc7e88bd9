"""The int8 screen of a wide output projection (layers/int8_head.py): the per-row int8
activations of layers/row_int8.py times an int8 weight packed in slices of CHUNK_ROWS output
rows, one oneDNN call per slice, each row's sums left in its own scale.

Why slices: the kernel allocates its output. For Gemma 3's 262144-row head at 16 rows (32 int8
rows with the residuals) that is 33.5 MB, over glibc's 32 MiB mmap threshold, so every call maps
fresh pages and faults each one in: 8193 page faults, 7.8 ms of system time per call measured
against 27 ms of user time (1 thread). A slice's output (8.4 MB at 16 rows) comes from the heap
and is freed before the next slice's, and the weight is still read once per call. Measured
again on the real head and states (1 thread, CPU ms per call, best of 5 interleaved): 16 rows
30.9 in slices of 65536 rows, 34.1 of 32768, 34.0 of 16384; 1 row 16.3, 18.8, 19.3.

Kernel shapes tried and left: oneDNN's AMX kernel (3.12) takes longer over this weight for 24-44
activation rows than for 48 (whole head, 1 thread: 2 rows 18.9 CPU ms, 16 rows 19.9, 32 rows
25.5, 40 rows 28.3, 48 rows 22.9, 64 rows 26.1), but padding a 16-row step's 32 rows (each row
and its residual) to 48 with zero rows gained nothing per call (31.0 against 30.96 ms: the
larger output), and bfloat16 output is no faster than float32. A sums buffer kept across calls
(no fresh 16.7 MB at 16 rows) saved 7.5 ms per call in one bench process's allocation state and
nothing in the engine's 16-row steps (93.6 CPU ms per step fresh, 95.3 kept; 1 thread,
interleaved), so each call allocates its own.

Why no division: the head compares scores within a row and bounds their error in the same
scale, so the [rows, V] division by each row's 1 / step (a positive factor) is left out.
"""
from __future__ import annotations

import torch
from torch import nn

from .row_int8 import RESIDUAL_WEIGHT, quantize_rows

CHUNK_ROWS = 65536  # a multiple of layers/screen_search.BLOCK


class Int8Screen(nn.Module):
    """x -> x_q W_q^T per row scaled by 1 / step, with the activations' quantization error."""

    memory_kind = "screening"  # layers/memory.py

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, chunk_rows: int = CHUNK_ROWS):
        """q int8 [N, K], scale float32 [N] (one per output row)."""
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.bounds = [(start, min(start + chunk_rows, q.shape[0])) for start in range(0, q.shape[0], chunk_rows)]
        for i, (start, end) in enumerate(self.bounds):
            self.register_buffer(f"packed_{i}", torch.ops.onednn.qlinear_prepack(q[start:end], None), persistent=False)
            self.register_buffer(f"scale_{i}", scale[start:end].float().contiguous(), persistent=False)
        widest = max(end - start for start, end in self.bounds)
        self.register_buffer("zero_points", torch.zeros(widest, dtype=torch.long), persistent=False)

    def project_scaled(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [M, K] float32 -> (h_q W_q^T [M, N] times each row's 1 / step, that 1 / step [M, 1],
        ||h - h_q|| [M, 1])."""
        rows = h.shape[0]
        q, inverse_step, error = quantize_rows(h.float(), residual_rows=True, with_error=True)
        sums = torch.empty(rows, self.out_features)
        for i, (start, end) in enumerate(self.bounds):
            both = torch.ops.onednn.qlinear_pointwise(
                q, 1.0, 0, getattr(self, f"packed_{i}"), getattr(self, f"scale_{i}"),
                self.zero_points[:end - start], None, 1.0, 0, torch.float32, "none", [], "")
            torch.add(both[:rows], both[rows:], alpha=RESIDUAL_WEIGHT, out=sums[:, start:end])
        return sums, inverse_step, error

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 weights in "
                f"{len(self.bounds)} slices, per-row int8 activations + residual")
