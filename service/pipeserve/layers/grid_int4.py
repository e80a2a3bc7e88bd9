"""The quantization "grouped" form: a GGUF's own 4-8 bit grids (grid_detect.py) held resident,
each linear computed by pipeserve's native kernel (grid_native.py) where its library is built,
else by torch's CPU int4 kernel as int4 planes (below). One module, GridInt4Linear, either way.

The native kernel (kernels/grid_linear.cpp) reads the levels as nibbles or bytes with float32
steps and origins, multiplies float32 activations, and dequantizes each weight once per block
of 4 output columns and call, whatever the number of rows. Gemma 3 270M's 72 block linears
per step (bench/generation/block_linears.py): see the README's grouped paragraph for numbers.
Where the library is not built (a machine without a compiler, a new torch or source since the
build) the form keeps the int4 planes, and the reason is logged once (kernels/library.py).

torch's kernel, aten._weight_int4pack_mm_for_cpu, computes x @ W^T with W in groups of 32
along K, each weight (q - 8) * scale + zero, q a 4-bit value, scale and zero bfloat16 per group
and output row. One such "plane" holds a 16-level grid (Q4_K) exactly. An 8-bit level is split
as lo + 16 * hi into two planes concatenated along K, the input repeated to match:
y = [x, x] @ [W_lo, W_hi]^T, still ONE kernel call per linear. Requantizing the file's 5-bit
weights to plain int4 instead dropped greedy agreement with the float path to 85.5% (Gemma 3
270M, 4 prompts x 64 teacher-forced tokens). What is not exact there: the bfloat16 scale and
zero (2^-8 relative each; the level is centred on the group's zero crossing so that the
rounding scales with |weight|, as bfloat16 weights would), the input rounded to bfloat16 and
the output to bfloat16 (measured harmless: 98.4% greedy agreement for those two alone).

Batch invariance, both kernels: every output is one row's dot products accumulated in float32
in the kernel's fixed order whatever the number of rows (torch's: measured bitwise equal from
1 to 200 rows; ours: by construction, tests/test_grid_native.py), and the casts are
elementwise: a row's result does not depend on its batch. No kernel is switched by row count.

Cost of the int4 planes: the kernel dequantizes each weight once per block of 4 rows and
multiplies in float32 FMAs, so its work grows with the planes (two planes: twice one's) and,
past a few rows, with the rows. On the 72 block linears (1 thread, CPU ms per step): 14.5 at
1 row and 74 at 16, row int8 17.0 and 27, float32 41 and 57.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .grid_detect import GROUP, LEVELS, PLANE_LEVELS, GroupGrids, detect_grids
from . import grid_native

# Level ranges, as (level - offset), that one and two planes represent: the kernel's q - 8 is
# in [-8, 7]; two planes add 16 * [-8, 7].
_ONE_PLANE = (-8, 7)
_TWO_PLANES = (-8 - 16 * 8, 7 + 16 * 7)  # [-136, 119]
# The kernel's packing takes output rows in blocks of 16.
_ROW_BLOCK = 16


def available() -> bool:
    """torch has the CPU int4 kernel and oneDNN's bfloat16 support on this CPU (AVX-512 or
    newer): the form feeds the kernel bfloat16 activations, its fast path (the float32 one is
    10-16x slower, notes: cpu-head-kernels)."""
    return (hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
            and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")
            and torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def unavailable_reason(device: torch.device) -> str | None:
    """Why the form cannot serve a model on `device` (None: it can, natively or through
    torch's int4 kernel)."""
    if device.type != "cpu":
        return f"it runs on the CPU only (its kernels take CPU tensors), not {device}"
    if not grid_native.available() and not available():
        return ("pipeserve's native kernels are not built here and this CPU or torch build lacks the int4 kernel "
                "or bfloat16 support (AVX-512); use load_in_8bit or float weights")
    return None


def convertible(linear: nn.Module) -> bool:
    """A CPU float nn.Linear whose shape the form takes (K in whole groups, N in blocks of 16:
    torch's int4 packing's, kept for the native kernel too so that the converted set does not
    depend on which kernel is there) and one of the kernels can compute."""
    if type(linear) is not nn.Linear:
        return False
    weight = linear.weight
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and weight.shape[1] % GROUP == 0 and weight.shape[0] % _ROW_BLOCK == 0
            and (grid_native.accepts(weight.shape[1]) or available()))


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
    """nn.Linear's map (float in and out) with the weight on its groups' grids, group 32:
    `kernel` "native" (levels as nibbles or bytes, pipeserve's kernel) where the library is
    built and takes the shape, else "int4" (1 or 2 int4 planes, torch's kernel). `planes` is 1
    for 16-level grids (4-bit levels in either kernel) and 2 for wider ones (native `bits` 5 or
    8); `planes` given forces 4 or 8 bits natively."""

    def __init__(self, linear: nn.Linear, planes: int | None = None, kernel: str | None = None):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        if kernel is None:
            kernel = "native" if grid_native.accepts(self.in_features) else "int4"
        if kernel not in ("native", "int4"):
            raise ValueError(f"kernel must be 'native' or 'int4', not {kernel!r}")
        if kernel == "native" and not grid_native.accepts(self.in_features):
            raise ValueError(f"the native kernel is not built or does not take in_features={self.in_features}")
        self.kernel = kernel
        grids = detect_grids(linear.weight)
        # the kernel's operands (derived from the weight: not in state_dict)
        if kernel == "native":
            packed = grid_native.pack(grids, None if planes is None else 4 * planes)
            self.bits = packed.bits
            self.planes = 1 if packed.bits == 4 else 2
            self.register_buffer("panels", packed.panels, persistent=False)
        else:
            encoded, _ = encode_planes(grids, planes)
            self.planes = encoded.planes
            self.register_buffer("packed", encoded.packed, persistent=False)
            self.register_buffer("scales_and_zeros", encoded.scales_and_zeros, persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone(),
                                                                  requires_grad=False)

    def native_grids(self) -> grid_native.NativeGrids:
        """The native kernel's operands (kernel "native" only)."""
        return grid_native.NativeGrids(self.panels, self.out_features, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.kernel == "native":
            y = grid_native.linear(x.reshape(-1, self.in_features), self.native_grids()).to(x.dtype)
        else:
            y = self._int4(x.reshape(-1, self.in_features)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def _int4(self, flat: torch.Tensor) -> torch.Tensor:
        flat = flat.to(torch.bfloat16)
        if self.planes == 2:
            flat = torch.cat([flat, flat], dim=1)  # [x, x] meets [W_lo, W_hi]
        return torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP, self.scales_and_zeros)

    def extra_repr(self) -> str:
        held = f"{self.bits}-bit levels" if self.kernel == "native" else (
            f"{self.planes} int4 plane{'s' if self.planes > 1 else ''}")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{held} of group {GROUP} ({self.kernel} kernel)")


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
