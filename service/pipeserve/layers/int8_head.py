"""Greedy text generation's output projection screened with int8 weights, with the float32
argmax.

A batch-1 decoding step of a small language model is memory-bound, and a large tied head is
most of what it reads (Gemma 3 270M: 262144 x 640, 671 MB in float32 of a step's ~1.1 GB).
Plain greedy decoding needs from it only the argmax. So:

1. screen: every logit from an int8 copy of the weight (one scale per row) and the hidden state
   quantized per row to int8 plus a residual int8 row (layers/row_int8.py: oneDNN's int8 GEMM,
   exact int32 sums): a quarter of float32's bytes;
2. bound, per row r, rigorously: |float32 logit_r - screened_r| <= e_r with
   e_r = a_r ||h|| + b (||h - h_q|| + 2^-12 ||h||) + 2^-20 b (||h|| + ||h - h_q||), where
   a_r = ||W_r - s_r q_r|| (the row's int8 rounding; Cauchy-Schwarz), b = max_r ||s_r q_r||,
   ||h - h_q|| the activation's quantization (measured per call), 2^-12 the float32 accumulation
   over up to 4096 features, 2^-20 the few float32 roundings after the exact integer sums, the
   whole bound times 1.01. Per-row a_r matters: a row with one outlier weight has a coarse
   scale (on Gemma the largest a_r is 4x the median), and one bound for all rows from the worst
   would rescore 10-100x more rows;
3. rescore in float32 every row whose upper bound reaches the largest lower bound (and every
   row within `margin` above that, for callers that want near-ties exact): the true argmax is
   among them, and every row left out has a screened value below the rescored maximum.

The scores returned are the float32 logits on the rescored rows and screened values (below the
maximum) elsewhere: right for an argmax, not for a softmax, which is why only argmax-only rows
use it (scheduling/generation_steps.argmax_only). When a step would rescore more than
`max_rescored` rows per sequence (flat distributions: random weights), it takes the float32
projection instead, and after mostly falling back probes one step in PROBE_EVERY.

Rows are computed alone (per-row scales, integer sums), so a row's choice does not depend on the
batch, and oneDNN's int8 GEMM reads the head once for all of a call's rows. Measured per call on
the 2-core build machine (1 thread, CPU ms, busy machine; bench/generation/head_rows.py):
1 row 17.3 (torch's weight-only kernel `_weight_int8pack_mm` with bfloat16 activations 28.7,
the bfloat16 screen of layers/verified_head.py 32.3, float32 52.2), 16 rows 35.2 (int8pack 156,
bfloat16 screen 74, float32 78). Needs VNNI (row_int8.available); elsewhere the pipeline keeps
the bfloat16 screen where oneDNN runs bfloat16 natively, else the float32 head.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .quantization import quantize_per_channel
from .row_int8 import RowInt8Linear, available as row_int8_available
from .verified_head import ACCUMULATION, SAFETY, ScreenPolicy

OUTPUT_ROUNDING = 2.0 ** -20  # int32 -> float32 and the scalings after it (4 roundings of 2^-24)
_ROWS_PER_SLICE = 8192  # the rounding norms are computed a slice at a time (no float32 copy)


def _rounding_norms(weight: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(per row ||W_r - s_r q_r||, max_r ||s_r q_r||), a slice of rows at a time."""
    rounding = torch.empty(weight.shape[0], dtype=torch.float32)
    largest = 0.0
    for start in range(0, weight.shape[0], _ROWS_PER_SLICE):
        end = start + _ROWS_PER_SLICE
        dequantized = q[start:end].float() * scale[start:end].float()[:, None]
        rounding[start:end] = (weight[start:end].float() - dequantized).norm(dim=1)
        largest = max(largest, float(dequantized.norm(dim=1).max()))
    return rounding, largest


class Int8ScreenedHead(ScreenPolicy, nn.Module):
    """x @ weight.T's argmax for greedy decoding, the weight screened in int8. `weight` (the
    tied embedding, float32) is shared, not copied; the derived tensors are buffers outside the
    state dict, counted as "screening" memory (layers/memory.py)."""

    memory_kind = "screening"

    def __init__(self, weight: torch.Tensor, margin: float = 0.0, max_rescored: int | None = None):
        super().__init__()
        weight = weight.detach()
        self.weight, self.margin = weight, margin
        # Rescoring a row reads it in float32 (4 bytes a weight, gathered): beyond a sixteenth
        # of the vocabulary the float32 projection is as cheap.
        self.max_rescored = max_rescored if max_rescored is not None else max(1, weight.shape[0] // 16)
        self._calls, self._fallback_rate = 0, 0.0
        q, scale = quantize_per_channel(weight)
        rounding, largest = _rounding_norms(weight, q, scale)
        shape = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.screen = RowInt8Linear(shape, quantized=(q, scale))
        self.screen.memory_kind = "screening"
        del q
        self.register_buffer("rounding_norms", rounding, persistent=False)
        self.row_norm = largest

    def project(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(screened logits [rows, V] float32, per row ||h - h_q|| [rows, 1])."""
        return self.screen.project_with_error(h)

    def scores(self, h: torch.Tensor, mask: Callable[[torch.Tensor], None],
               exact: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """h [rows, D] float32 -> scores [rows, V] float32 after `mask` (deterministic rules, in
        place) whose argmax is the float32 logits' argmax: every row that could hold the maximum
        (or lie within `margin` of it) is the float32 logit, the rest screened values below it."""
        rows = h.shape[0]
        if not self._worth_screening():
            return self._exact(h, mask, exact)
        scores, quantization = self.project(h)
        mask(scores)
        h_norm = h.norm(dim=1, keepdim=True)  # [rows, 1]
        shared = SAFETY * self.row_norm * (quantization + ACCUMULATION * h_norm
                                           + OUTPUT_ROUNDING * (h_norm + quantization))
        # Each float32 logit lies in [lower, upper]. A masked score (-inf) gets a NaN upper
        # bound (-inf + inf), which compares False: never picked.
        spread = torch.addcmul(shared, self.rounding_norms[None, :], h_norm, value=SAFETY)  # [rows, V]
        upper, lower = scores + spread, scores - spread
        best = lower.amax(dim=1, keepdim=True).clamp_(min=-1e30)  # a fully masked row has no finite score
        picked = (upper >= best - self.margin).nonzero()
        self._record(fell_back := picked.shape[0] > self.max_rescored * rows)
        if fell_back:
            return self._exact(h, mask, exact)
        r, c = picked[:, 0], picked[:, 1]
        scores[r, c] = (self.weight.index_select(0, c) * h.index_select(0, r)).sum(dim=1)
        mask(scores)  # a masked row that was rescored is masked again
        return scores

    @staticmethod
    def _exact(h, mask, exact) -> torch.Tensor:
        logits = exact(h).float()
        mask(logits)
        return logits

    def extra_repr(self) -> str:
        return f"vocab={self.weight.shape[0]}, dim={self.weight.shape[1]}, int8 screen"


def int8_screen_available(weight: torch.Tensor) -> bool:
    """A CPU float32 matrix and oneDNN's int8 GEMM with VNNI (layers/row_int8.available)."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2 and row_int8_available()
