"""Finds the grids a GGUF file stored its weights on, from the dequantized floats alone.

A GGUF's quantized blocks are grids: per group of 32 weights, value = origin + step * level,
with at most 256 levels (Q5_0: d * (q - 16), 32 levels; Q8_0: d * q, 255; a Q4_K sub-block:
d * sc * q - dmin * m, 16). Dequantized to float32 at load, they keep that form exactly, so it
can be found again from the floats alone (`detect_grids`, no knowledge of the file's block
types), and the weights held as their levels instead of float32 (3-6x fewer bytes per step):
as int4 planes for torch's kernel (grid_int4.py) or as nibbles / bytes for pipeserve's own
(grid_native.py). A group on no grid of <= 256 levels (Q6_K's two scales per 32 weights, float
checkpoints) takes the nearest 8-bit grid over its range (error <= half a step, (max - min) / 510).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP = 32  # weights per group along K: a GGUF block (Q4_K: 8 sub-blocks of 32)
LEVELS = 256  # the most levels two planes hold (8 bits)
PLANE_LEVELS = 16  # one plane: int4
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
