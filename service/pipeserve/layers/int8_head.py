"""Greedy text generation's output projection screened with int8 weights, with the float32
argmax.

A batch-1 decoding step of a small language model is memory-bound, and a large tied head is
most of what it reads (Gemma 3 270M: 262144 x 640, 671 MB in float32 of a step's ~1.1 GB).
Plain greedy decoding needs from it only the argmax. So:

1. screen: every logit from an int8 copy of the weight (one scale per row) and the bfloat16
   rounding of the hidden state, with torch's weight-only int8 kernel (aten._weight_int8pack_mm:
   bfloat16 activations, float32 accumulation, the scale applied in float32, the result rounded
   to bfloat16): a quarter of float32's bytes;
2. bound, per row r, rigorously: |float32 logit_r - screened_r| <= e_r with
   e_r = a_r ||h|| + b (||h - hi|| + 2^-12 ||hi||) + 2^-8 |screened_r|, where a_r = ||W_r -
   s_r q_r|| (the row's int8 rounding; Cauchy-Schwarz), b = max_r ||s_r q_r|| (the activation's
   bfloat16 rounding, and float32 accumulation over up to 4096 features), 2^-8 the output's
   bfloat16 rounding (2^-9, doubled), the whole bound times 1.01. Per-row a_r matters: a row
   with one outlier weight has a coarse scale (on Gemma the largest a_r is 4x the median), and
   a bound for all rows from the worst one would rescore 10-100x more rows;
3. rescore in float32 every row whose upper bound reaches the largest lower bound (and every
   row within `margin` above that, for callers that want near-ties exact): the true argmax is
   among them, and every row left out has a screened value below the rescored maximum.

The scores returned are the float32 logits on the rescored rows and screened values (below the
maximum) elsewhere: right for an argmax, not for a softmax, which is why only argmax-only rows
use it (scheduling/generation_steps.argmax_only). When a step would rescore more than
`max_rescored` rows per sequence (flat distributions: random weights), it takes the float32
projection instead, and after mostly falling back probes one step in PROBE_EVERY.

Only few rows are screened: the CPU kernel is a blocked GEMV that reads the whole int8 head
again for every 4 rows and turns compute-bound beyond 1-2 rows, where a bfloat16 GEMM (oneDNN,
AMX) does not. A call with more than `max_rows` rows (SCREEN_MAX_ROWS) goes to `wider` (the
bfloat16 VerifiedHead where the model has one) or to the float32 projection. Measured per call
on the build machine (CPU ms, 1 thread, loaded machine: int8 / bfloat16 screen / float32):
1 row 29.8 / 32.3 / 52.2, 2 rows 34.2 / 33.6 / 55.3, 4 rows 46.9 / 37.2 / 52.7, 8 rows
102 / 46 / 63, 16 rows 205 / 74 / 78 (/tmp-free reproduction: bench/generation/head_rows.py).
A prompt's last position is one row per request: screened too (TTFT).

Measured on the 2-core Xeon build machine (AVX512-BF16), Gemma 3 270M: token choices equal to
the float32 head's on every teacher-forced step tried (tests/test_int8_head.py); the kernel reads
the head in 12.7 ms where the bfloat16 screen's takes 32.9 and float32's 53.2 (quiet machine,
batch 1); whole screened steps, best of 36 on the busy machine:
46.8 ms against the bfloat16 screen's 56.6 and the float32 head's 58.1, at half the bfloat16
screen's memory (168 vs 336 MB; shared with a weight-only int8 lm_head, layers/weight_only.py).
The bfloat16 screen's availability rule holds here too: a CPU float32 weight and native
bfloat16 in oneDNN (where bfloat16 is emulated the screen would cost more than it saves).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .quantization import quantize_per_channel
from .verified_head import ACCUMULATION, SAFETY, available

SCREEN_MAX_ROWS = 2  # the crossover in rows measured above
OUTPUT_ROUNDING = 2.0 ** -8  # bfloat16 output: relative error <= 2^-9, doubled for the bound
_ROWS_PER_SLICE = 8192  # the rounding norms are computed a slice at a time (no float32 copy)


def int8pack_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


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


class Int8ScreenedHead(nn.Module):
    """x @ weight.T's argmax for greedy decoding, the weight screened in int8. `weight` (the
    tied embedding, float32) is shared, not copied; the derived tensors are buffers outside the
    state dict, counted as "screening" memory (layers/memory.py)."""

    memory_kind = "screening"
    PROBE_EVERY = 32

    def __init__(self, weight: torch.Tensor, margin: float = 0.0, max_rescored: int | None = None,
                 quantized: tuple[torch.Tensor, torch.Tensor] | None = None,
                 max_rows: int = SCREEN_MAX_ROWS, wider: nn.Module | None = None):
        super().__init__()
        weight = weight.detach()
        self.weight, self.margin, self.max_rows = weight, margin, max_rows
        # the head for calls with more rows (same `scores` contract), or None: the float32 projection
        self.wider = wider
        # Rescoring a row reads it in float32 (4 bytes a weight, gathered): beyond a sixteenth
        # of the vocabulary the float32 projection is as cheap.
        self.max_rescored = max_rescored if max_rescored is not None else max(1, weight.shape[0] // 16)
        self._calls, self._fallback_rate = 0, 0.0
        # `quantized`: (int8 [V, D], bfloat16 scales [V]) of this weight made elsewhere (a
        # weight-only int8 lm_head, layers/weight_only.py), shared instead of made again
        q, scale = quantized if quantized is not None else quantize_per_channel(weight)
        scale = scale.to(torch.bfloat16)  # the kernel takes scales in the activation's dtype
        rounding, largest = _rounding_norms(weight, q, scale)
        self.register_buffer("q", q, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("rounding_norms", rounding, persistent=False)
        self.row_norm = largest

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """The screened logits [rows, V] float32 (int8 weights, bfloat16 activations)."""
        return torch.ops.aten._weight_int8pack_mm(h.bfloat16(), self.q, self.scale).float()

    def _worth_screening(self) -> bool:
        self._calls += 1
        return self._fallback_rate <= 0.5 or self._calls % self.PROBE_EVERY == 0

    def _record(self, fell_back: bool) -> None:
        self._fallback_rate = 0.8 * self._fallback_rate + 0.2 * float(fell_back)

    def scores(self, h: torch.Tensor, mask: Callable[[torch.Tensor], None],
               exact: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """h [rows, D] float32 -> scores [rows, V] float32 after `mask` (deterministic rules, in
        place) whose argmax is the float32 logits' argmax: every row that could hold the maximum
        (or lie within `margin` of it) is the float32 logit, the rest screened values below it."""
        rows = h.shape[0]
        if rows > self.max_rows:
            return self.wider.scores(h, mask, exact) if self.wider is not None else self._exact(h, mask, exact)
        if not self._worth_screening():
            return self._exact(h, mask, exact)
        hi = h.bfloat16()
        scores = torch.ops.aten._weight_int8pack_mm(hi, self.q, self.scale).float()
        mask(scores)
        h_norm = h.norm(dim=1, keepdim=True)  # [rows, 1]
        shared = SAFETY * self.row_norm * ((h - hi.float()).norm(dim=1, keepdim=True) + ACCUMULATION * h_norm)
        # Each float32 logit lies in [lower, upper]. A masked score (-inf) gets a NaN upper
        # bound (-inf + inf), which compares False: never picked.
        spread = torch.addcmul(shared, self.rounding_norms[None, :], h_norm, value=SAFETY)  # [rows, V]
        rounding = scores.abs().mul_(SAFETY * OUTPUT_ROUNDING).add_(spread)
        upper, lower = scores + rounding, scores - rounding
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
    """The screen runs where the bfloat16 screen does (native bfloat16) and torch has the kernel."""
    return available(weight) and int8pack_available()
