"""The grouped form's grids packed for pipeserve's native kernel (kernels/grid_linear.cpp).

Same grids as the int4 planes (grid_detect.detect_grids: per group of 32 weights, value =
origin + step * level), held as the kernel reads them: the levels as 4-bit nibbles where every
group has at most 16 (Q4_K, Q4_0) and as bytes otherwise (Q5_0, Q8_0, Q6_K and float-derived
8-bit grids: one byte per weight, where the int4 form needs two planes of 4 bits), with a
float32 step and origin per group (exact for a GGUF's float16-derived steps, where the int4
form rounds both to bfloat16). The kernel takes float32 activations (no bfloat16 cast) and
computes W = level * step + origin in one rounding.

Bytes per weight: 0.5 + 8/32 at 4 bits (the int4 plane: 0.5 + 4/32), 1 + 8/32 at 8 bits (two
int4 planes: the same), so a Q4_K_M model is within a few MiB of its int4 form (Gemma 3 270M:
+3 MiB on the one-plane linears).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import library
from .grid_detect import GROUP, PLANE_LEVELS, GroupGrids


def available() -> bool:
    """The native library is built for this source, torch and CPU, and loaded."""
    return library.available()


def accepts(in_features: int) -> bool:
    """The native library is loaded and takes a linear with this many inputs."""
    return library.available() and in_features % GROUP == 0 and 0 < in_features <= library.max_in_features()


@dataclass(frozen=True)
class NativeGrids:
    """The kernel's operands: levels [N, K] uint8 (bits 8) or [N, K / 2] (bits 4: byte j of a
    group holds weight j in its low nibble and weight 16 + j in its high one), steps and
    origins [N, K / GROUP] float32."""

    levels: torch.Tensor
    steps: torch.Tensor
    origins: torch.Tensor
    bits: int

    def unpacked_levels(self) -> torch.Tensor:
        """[N, K] uint8: one level per weight."""
        if self.bits == 8:
            return self.levels
        n = self.levels.shape[0]
        halves = self.levels.view(n, -1, GROUP // 2)
        return torch.cat([halves & 15, halves >> 4], dim=-1).view(n, -1)

    def dequantized(self) -> torch.Tensor:
        """[N, K] float64: the weights as the kernel multiplies them (before its one float32
        rounding of level * step + origin)."""
        n = self.levels.shape[0]
        levels = self.unpacked_levels().view(n, -1, GROUP).double()
        return (levels * self.steps.double()[..., None] + self.origins.double()[..., None]).view(n, -1)


def pack(grids: GroupGrids, bits: int | None = None) -> NativeGrids:
    """`grids` as the kernel's operands, at 4 bits where every group fits 16 levels exactly
    (default), else (or with bits=8) one byte per level."""
    if bits is None:
        bits = 4 if grids.planes() == 1 else 8
    n, k = grids.levels.shape
    if bits == 4:
        if int(grids.top().max()) >= PLANE_LEVELS:
            raise ValueError("a group uses more than 16 levels: 4 bits cannot hold it")
        halves = grids.levels.view(n, k // GROUP, 2, GROUP // 2)
        levels = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, k // 2)
    elif bits == 8:
        levels = grids.levels
    else:
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    return NativeGrids(levels.contiguous(), grids.step.float().contiguous(), grids.origin.float().contiguous(), bits)


def linear(x: torch.Tensor, grids: NativeGrids, portable: bool = False) -> torch.Tensor:
    """x [M, K] (any float dtype) @ W^T -> [M, N] float32; `portable` forces the plain C++ path
    (tests compare it where the CPU has AVX-512)."""
    op = torch.ops.pipeserve.grid_linear_portable if portable else torch.ops.pipeserve.grid_linear
    return op(x.float().contiguous(), grids.levels, grids.steps, grids.origins, grids.bits)
