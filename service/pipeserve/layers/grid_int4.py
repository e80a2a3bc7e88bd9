"""Grouped weights on the grids a GGUF file stores them on, computed by torch's CPU int4 kernel.

A GGUF's quantized blocks are grids: per group of 32 weights, value = origin + step * level,
with at most 256 levels (Q5_0: d * (q - 16), 32 levels; Q8_0: d * q, 255; a Q4_K sub-block:
d * sc * q - dmin * m, 16). Dequantized to float32 at load, they keep that form exactly, so it
can be found again from the floats alone (`detect_grids`, no knowledge of the file's block
types), and the weights held as their levels instead of float32 (3-6x fewer bytes per step).

The kernel, aten._weight_int4pack_mm_for_cpu, computes x @ W^T with W in groups of 32 along K,
each weight (q - 8) * scale + zero, q a 4-bit value, scale and zero bfloat16 per group and
output row. One such "plane" holds a 16-level grid (Q4_K) exactly. An 8-bit level is split as
lo + 16 * hi into two planes concatenated along K, the input repeated to match:
y = [x, x] @ [W_lo, W_hi]^T, still ONE kernel call per linear. Requantizing the file's 5-bit
weights to plain int4 instead dropped greedy agreement with the float path to 85.5% (Gemma 3
270M, 4 prompts x 64 teacher-forced tokens).

What is not exact: the bfloat16 scale and zero (2^-8 relative each; the level is centred on
the group's zero crossing so that the rounding scales with |weight|, as bfloat16 weights
would), the input rounded to bfloat16 and the output to bfloat16 (measured harmless: 98.4%
greedy agreement for those two alone). A group on no grid of <= 256 levels (Q6_K's two scales
per 32 weights, float checkpoints) takes the nearest 8-bit grid over its range (error <= half
a step, (max - min) / 510).

Batch invariance: every output is one row's dot products accumulated in float32 in the
kernel's fixed order whatever the number of rows (measured bitwise equal from 1 to 200 rows),
and the bfloat16 casts are elementwise: a row's result does not depend on its batch.

Cost: the kernel dequantizes each weight once per block of 4 rows and multiplies in float32
FMAs, so its work grows with the planes (two planes: twice one's) and, past a few rows, with
the rows, where oneDNN's int8 GEMM (layers/row_int8.py) uses VNNI / AMX. On Gemma 3 270M's 72
fused block linears (bench/generation/block_linears.py, 1 thread, CPU ms per step): 14.5 at
1 row and 74 at 16, row int8 17.0 and 27, float32 41 and 57; whole Gemma decoding 44.6 CPU
ms per token alone (row int8 48.6), 13.5 at 16 streams (8.9), a 37-token prompt 226 ms (86).
No kernel is switched by row count: a row's result must not depend on its batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

GROUP = 32  # weights per group along K: a GGUF block (Q4_K: 8 sub-blocks of 32)
LEVELS = 256  # the most levels two planes hold (8 bits)
PLANE_LEVELS = 16  # one plane: int4
# Level ranges, as (level - offset), that one and two planes represent: the kernel's q - 8 is
# in [-8, 7]; two planes add 16 * [-8, 7].
_ONE_PLANE = (-8, 7)
_TWO_PLANES = (-8 - 16 * 8, 7 + 16 * 7)  # [-136, 119]
# The kernel's packing takes output rows in blocks of 16.
_ROW_BLOCK = 16
# A gap between two weights is a multiple of the step: candidates are the smallest gap / 1..8
# (a Q4_K group may skip levels, so the smallest gap can be 2 or 3 steps).
_MAX_DIVISOR = 8
# How far (in steps) a dequantized weight may sit from its level and still count as on the
# grid: the float32 dequantization rounds d * sc * q - dmin * m by ~2^-24 of its terms, and
# detection's own float32 arithmetic adds ~2^-24 * 255 levels.
_TOLERANCE = 2 ** -10
# Detection works on this many weights at a time: its float32 temporaries stay in the
# allocator's reused blocks (whole-tensor temporaries page-faulted: 5x slower).
_CHUNK_ELEMENTS = 1 << 16


def available() -> bool:
    """torch has the CPU int4 kernel and oneDNN's bfloat16 support on this CPU (AVX-512 or
    newer): the form feeds the kernel bfloat16 activations, its fast path (the float32 one is
    10-16x slower, notes: cpu-head-kernels)."""
    return (hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
            and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")
            and torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def unavailable_reason(device: torch.device) -> str | None:
    """Why the form cannot serve a model on `device` (None: it can)."""
    if device.type != "cpu":
        return f"it runs on the CPU only (torch's int4 kernel for CUDA takes another packing), not {device}"
    if not available():
        return ("this CPU or torch build lacks the int4 kernel or bfloat16 support (AVX-512); "
                "use load_in_8bit or float weights")
    return None


def convertible(linear: nn.Module) -> bool:
    """A CPU float nn.Linear whose shape the kernel takes (K in whole groups, N in blocks of 16)."""
    if type(linear) is not nn.Linear:
        return False
    weight = linear.weight
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and weight.shape[1] % GROUP == 0 and weight.shape[0] % _ROW_BLOCK == 0)


@dataclass(frozen=True)
class GroupGrids:
    """Each group's grid: weight[n, g * GROUP + i] ~ origin[n, g] + step[n, g] * levels[n, ...]."""

    levels: torch.Tensor  # [N, K] uint8 in [0, 255]
    origin: torch.Tensor  # [N, K / GROUP] float64: level 0's value (the group's minimum)
    step: torch.Tensor  # [N, K / GROUP] float64 (0 for a constant group)
    exact: torch.Tensor  # [N, K / GROUP] bool: every weight of the group is on its grid

    def top(self) -> torch.Tensor:
        """[N, K / GROUP] the highest level each group uses."""
        n, k = self.levels.shape
        return self.levels.view(n, k // GROUP, GROUP).amax(dim=-1)

    def planes(self) -> int:
        """1 when every group is exact with at most 16 levels (a Q4_K tensor), else 2."""
        return 1 if bool(self.exact.all()) and int(self.top().max()) < PLANE_LEVELS else 2

    def values(self) -> torch.Tensor:
        """[N, K] float64: the grids' values (what the weights are, exactly where `exact`)."""
        n, k = self.levels.shape
        grouped = self.levels.view(n, k // GROUP, GROUP).double()
        return (self.origin[..., None] + self.step[..., None] * grouped).view(n, k)


def detect_grids(weight: torch.Tensor) -> GroupGrids:
    """The coarsest grid of <= 256 levels that holds every weight of each group exactly, or the
    nearest 8-bit grid over the group's range where none does. weight: [N, K], K % 32 == 0."""
    rows, k = weight.shape
    if k % GROUP:
        raise ValueError(f"in_features {k} is not a multiple of the group size {GROUP}")
    chunk = max(1, _CHUNK_ELEMENTS // k)
    parts = [_detect_rows(weight[start:start + chunk]) for start in range(0, rows, chunk)]
    return GroupGrids(*(torch.cat(field) for field in zip(*parts)))


def _detect_rows(weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    n, k = weight.shape
    groups = weight.detach().float().reshape(n, k // GROUP, GROUP)
    low, high = groups.aminmax(dim=-1)
    span = high - low
    offsets = groups - low[..., None]
    gaps = offsets.sort(dim=-1).values.diff(dim=-1)
    # gaps below float noise are equal values, not a step
    gaps = torch.where(gaps > span[..., None] * 2 ** -20, gaps, torch.inf)
    smallest = gaps.amin(dim=-1)  # inf for a constant group
    step = span / (LEVELS - 1)  # the fallback: the nearest 8-bit grid over the range
    exact = span == 0
    for divisor in range(1, _MAX_DIVISOR + 1):
        candidate = smallest / divisor
        # only groups whose range spans at most 255 candidate steps can fit: a cheap test on
        # [N, G] that skips every float (non-grid) group without reading its weights
        todo = (~exact & (span <= candidate * (LEVELS - 1 + _TOLERANCE))).nonzero(as_tuple=True)
        if not todo[0].numel():
            continue
        position = offsets[todo] / candidate[todo][:, None]
        fits = (position - position.round()).abs().amax(dim=-1) <= _TOLERANCE
        found = tuple(index[fits] for index in todo)
        step[found] = candidate[todo][fits]
        exact[found] = True
    safe = torch.where(span > 0, step, 1.0)
    levels = (offsets / safe[..., None]).round_().clamp_(0, LEVELS - 1)
    step = torch.where(span > 0, step, 0.0)
    return levels.to(torch.uint8).view(n, k), low.double(), step.double(), exact


@dataclass(frozen=True)
class Int4Planes:
    """The kernel's operands: `packed` (aten's int4pack of [N, planes * K]) and
    `scales_and_zeros` [planes * K / GROUP, N, 2] bfloat16."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    planes: int

    def dequantized(self, n: int, k: int, codes: torch.Tensor) -> torch.Tensor:
        """[N, K] float64: the weight the kernel multiplies by, from the 4-bit `codes`
        [N, planes * K] this was packed from (the packed layout is the kernel's own)."""
        groups = codes.view(n, -1, GROUP).double() - 8
        scale, zero = self.scales_and_zeros.double().unbind(-1)  # [planes * G, N]
        per_plane = (groups * scale.t()[..., None] + zero.t()[..., None]).view(n, self.planes, k)
        return per_plane.sum(dim=1)


def encode_planes(grids: GroupGrids, planes: int | None = None) -> tuple[Int4Planes, torch.Tensor]:
    """The grids as 1 or 2 int4 planes (default: grids.planes()) -> (planes, their 4-bit codes
    [N, planes * K] int32, kept only by tests and error analysis)."""
    planes = grids.planes() if planes is None else planes
    low_c, high_c = _ONE_PLANE if planes == 1 else _TWO_PLANES
    n, k = grids.levels.shape
    top = grids.top().double()
    # Centre the levels on the group's zero crossing: value = zero + step * (level - offset),
    # zero = origin + step * offset as small as the range allows, so that the bfloat16 rounding
    # of the zero stays small and that of the scale grows with |value|.
    safe = torch.where(grids.step > 0, grids.step, 1.0)
    offset = torch.round(-grids.origin / safe).clamp_(max=-low_c).maximum(top - high_c)
    offset = torch.where(grids.step > 0, offset, 0.0)
    zero = grids.origin + grids.step * offset
    # int16: levels 0..255 minus an offset in [-119, 136] (half the bytes of int64 temporaries)
    centred = grids.levels.view(n, k // GROUP, GROUP).to(torch.int16) - offset.to(torch.int16)[..., None]
    scale = grids.step.bfloat16()
    if planes == 1:
        codes = (centred + 8).view(n, k)
        scales, zeros = scale, zero.bfloat16()
    else:
        low = (centred + 8) % PLANE_LEVELS - 8  # in [-8, 7]
        high = (centred - low) // PLANE_LEVELS  # in [-8, 7]
        codes = torch.cat([(low + 8).view(n, k), (high + 8).view(n, k)], dim=1)
        # 16 * a bfloat16 is a bfloat16: the high plane's scale adds no rounding of its own
        scales = torch.cat([scale, scale * PLANE_LEVELS], dim=1)
        zeros = torch.cat([zero.bfloat16(), torch.zeros_like(scale)], dim=1)
    codes = codes.to(torch.int32).contiguous()
    scales_and_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).contiguous()  # [planes * G, N, 2]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    return Int4Planes(packed, scales_and_zeros, planes), codes


class GridInt4Linear(nn.Module):
    """nn.Linear's map (float in and out) with the weight as 1 or 2 int4 planes, group 32."""

    def __init__(self, linear: nn.Linear, planes: int | None = None):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        encoded, _ = encode_planes(detect_grids(linear.weight), planes)
        self.planes = encoded.planes
        # the kernel's packed codes and per-group scales/zeros (derived: not in state_dict)
        self.register_buffer("packed", encoded.packed, persistent=False)
        self.register_buffer("scales_and_zeros", encoded.scales_and_zeros, persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone(),
                                                                  requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.planes == 2:
            flat = torch.cat([flat, flat], dim=1)  # [x, x] meets [W_lo, W_hi]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP, self.scales_and_zeros)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.planes} int4 plane{'s' if self.planes > 1 else ''} of group {GROUP}")


def quantize_grid_int4(model: nn.Module, skip: set[int] = frozenset()) -> int:
    """Replaces every convertible nn.Linear (fused projections included) by a GridInt4Linear,
    in place, except the modules whose id() is in `skip`; -> how many. A linear the kernel
    cannot take (its shape) stays as it is."""
    count = 0
    # (parent, name) slots: each replaced linear's float weight is freed as we go
    slots = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
             if convertible(child) and id(child) not in skip]
    for parent, name in slots:
        setattr(parent, name, GridInt4Linear(getattr(parent, name)))
        count += 1
    return count
