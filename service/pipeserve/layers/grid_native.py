"""The grouped form's grids packed for pipeserve's native kernel (kernels/grid_linear.cpp).

Same grids as the int4 planes (grid_detect.detect_grids: per group of 32 weights, value =
origin + step * level), held as the kernel reads them, in the fewest bits that hold every
group's levels: 4 (16 levels: Q4_K, Q4_0; nibbles), 5 (32 levels: Q5_0; nibbles and a 32-bit
word of fifth bits per group, as ggml's Q5_0 keeps them) or 8 (Q8_0, Q6_K and float-derived
8-bit grids; a byte each, where the int4 form needs two planes of 4 bits), with a float32 step
and origin per group (exact for a GGUF's float16-derived steps, where the int4 form rounds
both to bfloat16). The kernel takes float32 activations (no bfloat16 cast) and computes
W = level * step + origin in one rounding.

Bytes per weight, with the step and origin's 8/32: 0.75 at 4 bits (the int4 plane: 0.625),
0.875 at 5 bits and 1.25 at 8 (two int4 planes: 1.25 for either). A decoding step reads the
bytes of every weight once, so the 5-bit Q5_0 linears (Gemma 3's qkv and gate_up) read 30%
fewer bytes than as two planes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import library
from .grid_detect import GROUP, GroupGrids

# bytes per group of 32 weights at each level width, smallest first
GROUP_BYTES = {4: GROUP // 2, 5: GROUP // 2 + 4, 8: GROUP}
PANEL_COLUMNS = 4  # output columns per panel (the kernel's kCols)
_FLOAT = 4  # bytes of each record's float32 step and origin


def available() -> bool:
    """The native library is built for this source, torch and CPU, and loaded."""
    return library.available()


def accepts(in_features: int) -> bool:
    """The native library is loaded and takes a linear with this many inputs."""
    return library.available() and in_features % GROUP == 0 and 0 < in_features <= library.max_in_features()


@dataclass(frozen=True)
class NativeGrids:
    """The kernel's operand: `panels` [ceil(N / 4), K / GROUP * 4 * record] uint8, panels of 4
    output columns, group by group, a record per group and column: its levels (bits 4: byte j
    holds weight j in its low nibble and weight 16 + j in its high one; bits 5: those 16 bytes,
    then a little-endian uint32 whose bit i is weight i's fifth bit; bits 8: a byte per
    weight), then its float32 step and origin. A block of columns reads one stream."""

    panels: torch.Tensor
    out_features: int
    bits: int

    def records(self) -> torch.Tensor:
        """[N, K / GROUP, record bytes] uint8: each column's records in order."""
        blocks, _ = self.panels.shape
        record = GROUP_BYTES[self.bits] + 2 * _FLOAT
        by_column = self.panels.view(blocks, -1, PANEL_COLUMNS, record).transpose(1, 2)
        return by_column.reshape(blocks * PANEL_COLUMNS, -1, record)[:self.out_features]

    def unpacked_levels(self) -> torch.Tensor:
        """[N, K] uint8: one level per weight."""
        groups = self.records()[..., :GROUP_BYTES[self.bits]]
        n = groups.shape[0]
        if self.bits == 8:
            return groups.reshape(n, -1)
        nibbles = groups[..., :GROUP // 2]
        levels = torch.cat([nibbles & 15, nibbles >> 4], dim=-1)
        if self.bits == 5:
            words = groups[..., GROUP // 2:].to(torch.int64)
            word = words[..., 0] | words[..., 1] << 8 | words[..., 2] << 16 | words[..., 3] << 24
            fifth = (word[..., None] >> torch.arange(GROUP)) & 1
            levels = levels | (fifth << 4).to(torch.uint8)
        return levels.reshape(n, -1)

    def steps_and_origins(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, K / GROUP] float32 each."""
        floats = self.records()[..., GROUP_BYTES[self.bits]:].contiguous().view(torch.float32)
        return floats[..., 0], floats[..., 1]

    def dequantized(self) -> torch.Tensor:
        """[N, K] float64: the weights as the kernel multiplies them (before its one float32
        rounding of level * step + origin)."""
        n = self.out_features
        steps, origins = (t.double() for t in self.steps_and_origins())
        levels = self.unpacked_levels().view(n, -1, GROUP).double()
        return (levels * steps[..., None] + origins[..., None]).view(n, -1)


def pack(grids: GroupGrids, bits: int | None = None) -> NativeGrids:
    """`grids` as the kernel's operand, in the fewest bits that hold every group's levels
    (default) or in `bits` (4, 5 or 8; ValueError where a level does not fit)."""
    top = int(grids.top().max()) if grids.levels.numel() else 0
    if bits is None:
        bits = next(b for b in GROUP_BYTES if top < 1 << b)
    if bits not in GROUP_BYTES:
        raise ValueError(f"bits must be one of {sorted(GROUP_BYTES)}, not {bits}")
    if top >= 1 << bits:
        raise ValueError(f"a group uses level {top}: {bits} bits cannot hold it")
    n, k = grids.levels.shape
    groups = grids.levels.view(n, k // GROUP, GROUP)
    if bits == 8:
        levels = groups
    else:
        levels = (groups[..., :GROUP // 2] & 15) | ((groups[..., GROUP // 2:] & 15) << 4)  # [N, G, 16]
        if bits == 5:
            word = ((groups >> 4).to(torch.int64) << torch.arange(GROUP)).sum(dim=-1)  # bit i: weight i's fifth
            word_bytes = torch.stack([(word >> shift) & 255 for shift in (0, 8, 16, 24)], dim=-1)
            levels = torch.cat([levels, word_bytes.to(torch.uint8)], dim=-1)
    floats = torch.stack([grids.step.float(), grids.origin.float()], dim=-1)  # [N, G, 2]
    records = torch.cat([levels, floats.view(torch.uint8).view(n, k // GROUP, 2 * _FLOAT)], dim=-1)
    padded = -n % PANEL_COLUMNS  # zero records: level 0, step 0, origin 0 (outputs never stored)
    records = torch.cat([records, records.new_zeros(padded, *records.shape[1:])])
    panels = records.view(-1, PANEL_COLUMNS, k // GROUP, records.shape[-1]).transpose(1, 2)
    return NativeGrids(panels.reshape(panels.shape[0], -1).contiguous(), n, bits)


def linear(x: torch.Tensor, grids: NativeGrids, portable: bool = False) -> torch.Tensor:
    """x [M, K] (any float dtype) @ W^T -> [M, N] float32; `portable` forces the plain C++ path
    (tests compare it where the CPU has AVX-512)."""
    op = torch.ops.pipeserve.grid_linear_portable if portable else torch.ops.pipeserve.grid_linear
    return op(x.float().contiguous(), grids.panels, grids.out_features, grids.bits)
