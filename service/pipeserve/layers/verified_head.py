"""Greedy decoding's vocabulary projection read at half the bytes, with the float32
answer.

A batch-1 Whisper decoding step is memory-bound, and the tied output projection (51864 x 384
float32 for tiny: 80 MB) is most of what it reads. Greedy decoding needs from it only the
argmax after the logits rules, the maximum text logit and the log-sum-exp of the timestamp
logits (timestamp rule), and the log-softmax of the chosen token (fallback thresholds). So:

1. screen: every text logit from a bfloat16 copy of the weight (oneDNN, AVX512-BF16), with
   the activation split into a bfloat16 high and low part (two rows cost what one does in a
   memory-bound product) so that only the weight's rounding remains; the timestamp logits
   (1501 rows) exactly in float32;
2. bound: |float32 logit - screened logit| <= e + rho |screened| for every row, rigorously:
   e = (max_r ||W_r - bf16(W_r)||) ||h|| (Cauchy-Schwarz on the weight's rounding)
     + (max_r ||W_r||) (||h - hi - lo|| + 2^-12 ||h||) (activation split, float32 accumulation),
   rho = 2^-8 (the kernel rounds its output to bfloat16), both times 1.01;
3. rescore in float32 every allowed text logit screened within a band of the top screened
   one, the band wide enough that every token outside it has a float32 logit more than
   `margin` below the top token's.

Step 3 makes the text maximum, hence the argmax and the timestamp rule, those of float32
logits. The log-softmax also sums the unrescored tail, screened values more than `margin`
(8) below the maximum: on real speech (tiny.en) it moves log-probabilities by at most 5e-5
(mean 6e-6), the size of float32's own summation error over the vocabulary (1.4e-5); with
margin 8 a median of 5 rows (90th percentile 94) are rescored. When a step would rescore
more than `max_rescored` rows per sequence (flat distributions: noise), it takes the float32
projection instead.

Measured on the build machine (2 AMD EPYC cores): the projection 0.82 ms -> 0.25 ms.
Used for greedy (temperature 0) Whisper steps and for plain greedy text generation (tied
heads: GPT-2, OPT, tied Llama-family models; rows without sampling, penalties, n-gram or
minimum-length rules, or log-probabilities) on CPU float32 models where oneDNN runs bfloat16
natively; sampling, beam search and prompt passes keep the float32 projection.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

# Text logits provably more than this below the maximum keep their screened value.
MARGIN = 8.0
SAFETY = 1.01
ACCUMULATION = 2.0 ** -12  # >= n * 2^-24 for n up to 4096 input features
OUTPUT_ROUNDING = 2.0 ** -8  # bfloat16 keeps 8 significant bits: relative error <= 2^-9


def available(weight: torch.Tensor) -> bool:
    """The CPU runs oneDNN bfloat16 natively and the weight is a CPU float32 matrix."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def enabled(weight: torch.Tensor, options) -> bool:
    """A pipeline loaded with `options` (LoadOptions) screens a projection with this weight: the
    CPU fast paths are on (`packed_linear`), the head stays float32 (not int8) and `available`."""
    return options.packed_linear and not options.load_in_8bit and available(weight)


def _largest_row_norms(weight: torch.Tensor, low: torch.Tensor, rows_per_slice: int = 4096) -> tuple[float, float]:
    """(max row norm of weight - low, max row norm of weight), a slice of rows at a time: the
    difference of a whole 262k-row head would be a float32 copy of it (and low.float() another)."""
    rounding = largest = 0.0
    for start in range(0, weight.shape[0], rows_per_slice):
        rows = weight[start:start + rows_per_slice]
        rounding = max(rounding, float((rows - low[start:start + rows_per_slice].float()).norm(dim=1).max()))
        largest = max(largest, float(rows.norm(dim=1).max()))
    return rounding, largest


# Flat distributions (noise, random weights) rescore too much and fall back to the float32
# projection after paying for the screen: when most recent steps fell back, a screened head
# screens only one step in PROBE_EVERY until screening pays again.
class ScreenPolicy:
    """When a screened head screens (mixed into VerifiedHead and layers/int8_head.py's head;
    their __init__ sets `_calls, _fallback_rate = 0, 0.0`)."""

    PROBE_EVERY = 32
    _calls: int
    _fallback_rate: float

    def _worth_screening(self) -> bool:
        self._calls += 1
        return self._fallback_rate <= 0.5 or self._calls % self.PROBE_EVERY == 0

    def _record(self, fell_back: bool) -> None:
        self._fallback_rate = 0.8 * self._fallback_rate + 0.2 * float(fell_back)


class VerifiedHead(ScreenPolicy, nn.Module):
    """x @ weight.T for greedy decoding: screened rows [0, exact_from), exact rows [exact_from, V).
    `weight` (the tied embedding) is shared, not copied; the derived tensors are buffers outside
    the state dict, so the model's memory accounting sees them."""

    def __init__(self, weight: torch.Tensor, exact_from: int | None = None, margin: float = MARGIN,
                 max_rescored: int = 4096):
        super().__init__()
        weight = weight.detach()
        exact_from = weight.shape[0] if exact_from is None else exact_from
        self.weight, self.exact_from, self.margin, self.max_rescored = weight, exact_from, margin, max_rescored
        self._calls, self._fallback_rate = 0, 0.0  # see _worth_screening
        screened = weight[:exact_from]  # row- or column-major (a shared tied head: layers/head_layout.py)
        low = screened.to(torch.bfloat16, memory_format=torch.contiguous_format)
        self.register_buffer("low", torch.ops.mkldnn._reorder_linear_weight(low), persistent=False)
        tail = weight[exact_from:]
        self.register_buffer("exact_tail", torch.ops.mkldnn._reorder_linear_weight(tail.contiguous())
                             if tail.shape[0] else None, persistent=False)
        # The largest row norm of the bfloat16 rounding and of the rows themselves: one bound
        # for all rows costs a few scalar operations per step instead of vocabulary-sized ones,
        # and widens the rescored band by a fraction of a logit.
        self.rounding_norm, self.row_norm = _largest_row_norms(screened, low)
        del low

    def scores(self, h: torch.Tensor, mask: Callable[[torch.Tensor], None],
               exact: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """h [rows, D] float32 -> scores [rows, V] float32 after `mask` (the deterministic rules,
        in place), where every finite text score within `margin` of the text maximum and every
        timestamp score is the float32 logit; the rest are screened values below that band."""
        rows, split = h.shape[0], self.exact_from
        if not self._worth_screening():
            logits = exact(h).float()
            mask(logits)
            return logits
        hi = h.bfloat16()
        lo = (h - hi.float()).bfloat16()
        both = torch.ops.mkldnn._linear_pointwise(torch.cat([hi, lo]), self.low, None, "none", [], "")
        scores = torch.empty(rows, self.weight.shape[0])
        scores[:, :split] = both.view(2, rows, split).sum(0, dtype=torch.float32)
        if self.exact_tail is not None:
            scores[:, split:] = torch.ops.mkldnn._linear_pointwise(h, self.exact_tail, None, "none", [], "")
        mask(scores)
        text = scores[:, :split]

        # Per row: screened = float32 logit +- (weight_error + relative * |value|) (module doc).
        h_norm = h.norm(dim=1)
        weight_error = SAFETY * (self.rounding_norm * h_norm + self.row_norm * (
            (h - hi.float() - lo.float()).norm(dim=1) + ACCUMULATION * h_norm))
        relative = SAFETY * OUTPUT_ROUNDING
        top = text.amax(dim=1).clamp_(min=-1e30)  # a fully masked row has no finite text score
        # A token screened below top - band has a float32 logit below the top token's, and
        # below it by more than `margin` (a + e + relative|a| grows with a; solve for the band).
        band = (2 * weight_error + self.margin + 2 * relative * top.abs()) / (1 - relative)
        picked = (text >= (top - band)[:, None]).nonzero()
        self._record(fell_back := picked.shape[0] > self.max_rescored * rows)
        if fell_back:
            logits = exact(h).float()  # the float32 projection
            mask(logits)
            return logits
        r, c = picked[:, 0], picked[:, 1]
        text[r, c] = (self.weight.index_select(0, c) * h.index_select(0, r)).sum(dim=1)
        return scores
