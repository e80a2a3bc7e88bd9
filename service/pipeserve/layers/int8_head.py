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
   among them. The rows are found by layers/screen_search.py on blocks of 64 screened scores
   (the int8 rows are stored sorted by a_r, so a block's rows have about the same bound), not by
   bound arithmetic over all V scores (five [rows, V] float32 passes: at 16 rows they cost as
   much as the screen's own GEMM), and in each row's own scale (the int32 sums times the
   activation's 1 / step, positive) without dividing all V scores by it.

Why the residual activation row stays, at 16 rows too: without it (8-bit activations; the
screen's GEMM ~18 instead of ~22 CPU ms at 16 rows, and no add) the bound's activation term
||h - h_q|| max_r ||s_r q_r|| grows from ~0.01 to ~2.9 logits on Gemma's real states (||h|| ~120),
and the tokens to rescore per row from a median of 5 (mean 11, p90 23, max 502) to 113 (mean
517, p90 1373, max 27060): their float32 rows, gathered at 2.5 KB each, cost more than the
residual saves (16 rows 57.8 against 49.4 CPU ms per call, same run, 1 thread).

The scores returned are the float32 logits on the rescored rows and -inf elsewhere: right for an
argmax, not for a softmax, which is why only argmax-only rows use it
(scheduling/generation_steps.argmax_only). Masks set scores to -inf; one that lists what it
masks (`mask.entries`, as generation_steps.eos_masks does) is applied in the screen's order
directly, any other is found by applying it to zeros. When a step would rescore more than
`max_rescored` rows per sequence (flat distributions: random weights), it takes the float32
projection instead, and after mostly falling back probes one step in PROBE_EVERY. A decoding
step whose rows all take the argmax asks for the tokens instead (`choose`,
scheduling/generation_steps.decode_argmax): the same tokens as the dense scores' first maximum,
without writing -inf over [rows, V] and scanning it (at 16 rows ~6 of a step's ~90 CPU ms, 1
thread: the fill ~1 ms, the engine's max with indices over [16, 262144] 3-5 ms).

Rows are computed alone (per-row scales, integer sums), so a row's choice does not depend on the
batch, and oneDNN's int8 GEMM reads the head once for all of a call's rows. Measured per call on
Gemma 3 270M's head and real hidden states (bench/generation/head_rows.py --real; 1 thread,
median CPU ms, 2-core Xeon with AMX, load ~3): 1 row 16-17, 8 rows 20-21, 16 rows 29-33, against
17-19, 28-33 and 81-85 when the bound was computed over all V scores (at 16 rows those passes and
the page faults of a 33.5 MB kernel output, layers/int8_screen.py, cost more than the GEMM). At
1 row the GEMM is the call: 168 MB of int8 weights. An int4 screen (84 MB; torch's
`_weight_int4pack_mm_for_cpu`, 11-13 CPU ms at 1 row) is not used: its rigorous bound (int4
rounding ~0.09-0.13 of a row's norm, times ||h|| by Cauchy-Schwarz) leaves a median of 34k
(group 32) to 222k (group 128) of the 262k tokens to rescore on the same states. Needs VNNI
(row_int8.available); elsewhere the pipeline keeps the bfloat16 screen where oneDNN runs
bfloat16 natively, else the float32 head.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .int8_screen import Int8Screen
from .quantization import quantize_per_channel
from .row_int8 import available as row_int8_available
from .screen_search import block_maxima, rows_to_rescore
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


def masked_entries(mask: Callable[[torch.Tensor], None], rows: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch rows, token ids) a mask sets to -inf: its `entries` [(row, [ids])] when it lists
    them (scheduling/generation_steps.eos_masks), else found by applying it to zeros."""
    entries = getattr(mask, "entries", None)
    if entries is None:
        probe = torch.zeros(rows, vocab)
        mask(probe)
        return (probe == -math.inf).nonzero(as_tuple=True)
    pairs = [(row, token) for row, ids in entries for token in ids]
    if not pairs:
        empty = torch.empty(0, dtype=torch.long)
        return empty, empty
    return torch.tensor(pairs, dtype=torch.long).unbind(1)


class Int8ScreenedHead(ScreenPolicy, nn.Module):
    """x @ weight.T's argmax for greedy decoding, the weight screened in int8. `weight` (the
    tied embedding, float32) is shared, not copied; the derived tensors are buffers outside the
    state dict, counted as "screening" memory (layers/memory.py). The int8 copy's rows are sorted
    by their rounding norm (`order`: screen position -> token id), so that each block of the
    candidate search (layers/screen_search.py) holds rows of about the same bound."""

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
        order = rounding.argsort()
        self.screen = Int8Screen(q[order], scale[order])
        del q
        # int32 indices (1 MiB each for 262k tokens): screen position -> token id and back
        self.register_buffer("order", order.int(), persistent=False)
        self.register_buffer("position", order.argsort().int(), persistent=False)
        self.register_buffer("sorted_rounding", rounding[order], persistent=False)
        self.register_buffer("block_rounding", block_maxima(self.sorted_rounding), persistent=False)
        self.row_norm = largest

    @property
    def rounding_norms(self) -> torch.Tensor:
        """Per token id ||W_r - s_r q_r|| [V]."""
        return self.sorted_rounding[self.position]

    def project(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(screened logits [rows, V] float32 by token id, per row ||h - h_q|| [rows, 1]): for
        tests and benches; scores() works on the screen's own order and scale."""
        scaled, inverse_step, quantization = self.screen.project_scaled(h)
        return scaled.div_(inverse_step)[:, self.position], quantization

    def scores(self, h: torch.Tensor, mask: Callable[[torch.Tensor], None],
               exact: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """h [rows, D] float32 -> scores [rows, V] float32 whose argmax is the float32 logits'
        argmax after `mask` (deterministic rules that set scores to -inf, in place): every token
        that could hold the maximum (or lie within `margin` of it) has its float32 logit, every
        other token -inf."""
        found = self._rescored(h, mask) if self._worth_screening() else None
        if found is None:
            return self._exact(h, mask, exact)
        scaled, r, tokens, logits = found
        out = scaled.fill_(-math.inf)  # the screen's buffer, now by token id
        out[r, tokens] = logits
        return out

    def choose(self, h: torch.Tensor, mask: Callable[[torch.Tensor], None],
               exact: Callable[[torch.Tensor], torch.Tensor],
               finish: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """h [rows, D] float32 -> each row's token [rows] (int64): what
        `finish(scores(h, mask, exact)).max(-1).indices` gives (the first maximum), without the
        [rows, V] scores, whose -inf fill and scan cost a 16-row step ~6 CPU ms (bench in the
        module doc). `finish` is the family's elementwise, non-decreasing last word on the logits
        (Gemma's soft cap; it can round two logits to one value, so it is applied before the
        comparison, as it is to the dense scores)."""
        found = self._rescored(h, mask) if self._worth_screening() else None
        if found is None:
            logits = self._exact(h, mask, exact)
            return (finish(logits) if finish is not None else logits).max(dim=-1).indices
        _, r, tokens, logits = found
        if finish is not None:
            logits = finish(logits)
        rows, vocab = h.shape[0], self.weight.shape[0]
        best = torch.full((rows,), -math.inf).scatter_reduce_(0, r, logits, "amax")
        top = logits == best[r]
        chosen = torch.full((rows,), vocab).scatter_reduce_(0, r[top], tokens[top], "amin")
        # A row with no candidate is fully masked: the dense scores' maximum is then their first.
        return chosen.masked_fill_(chosen == vocab, 0)

    def _rescored(self, h: torch.Tensor, mask: Callable[[torch.Tensor], None]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(the screen's scores [rows, V] in its order, then for every token that could hold its
        row's maximum: batch row, token id, float32 logit), or None when more than
        `max_rescored` per row would be rescored (the caller takes the float32 projection)."""
        rows = h.shape[0]
        # Each row's scores times its activation's 1 / step (> 0): a row's order, unscaled.
        scaled, inverse_step, quantization = self.screen.project_scaled(h)
        masked_rows, masked_tokens = masked_entries(mask, rows, self.weight.shape[0])
        scaled[masked_rows, self.position[masked_tokens]] = -math.inf
        h_norm = h.norm(dim=1, keepdim=True)  # [rows, 1]
        # |float32 logit - screened| <= alpha a_r + beta (module doc), in the screen's scale
        alpha = SAFETY * h_norm * inverse_step
        beta = SAFETY * self.row_norm * (quantization + ACCUMULATION * h_norm
                                         + OUTPUT_ROUNDING * (h_norm + quantization)) * inverse_step
        r, p = rows_to_rescore(scaled, self.sorted_rounding, self.block_rounding, alpha, beta,
                               self.margin * inverse_step)
        self._record(fell_back := r.shape[0] > self.max_rescored * rows)
        if fell_back:
            return None
        tokens = self.order[p].long()
        logits = (self.weight.index_select(0, tokens) * h.index_select(0, r)).sum(dim=1)
        return scaled, r, tokens, logits

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
