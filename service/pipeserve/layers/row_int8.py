"""Int8 linears whose every row is computed alone: int8 weights (one scale per output channel)
times activations quantized to int8 with one scale per row, through oneDNN's prepacked int8
GEMM (VNNI / AMX-INT8), the int32 sums rescaled in float32.

Why not fbgemm's dynamic int8 (layers/quantization.py): it takes one activation scale for the
whole batch, so a request's tokens depend on which other requests share its decoding step. Here
a row's scale is its own, the int8 products are summed exactly in int32 (integer sums do not
depend on the kernel's order or blocking, whatever the batch size makes oneDNN pick), and the
scales are applied element by element: a row's output is bitwise the same in any batch.

Why not weight-only int8 (aten._weight_int8pack_mm, bfloat16 activations): its CPU kernel is a
blocked GEMV that reads the weight again for every 4 rows (measured on Gemma 3 270M's 126 block
linears, 1 thread: 31 ms at 1 row, 113 ms at 16 against this kernel's 29 and 30 ms).

Precision: `residual_rows` (the default) quantizes each activation row twice, the row and what
its int8 rounding left (scale / 254): ~15 significant bits, so the weight's int8 rounding is
what remains, as for weight-only int8. The second row costs little where decoding is
memory-bound (the weight is read once for both). Without it, 8-bit activations.

At many rows (Gemma 3 270M's shapes, oneDNN 3.12 with AMX, 1 thread, us per call at 16 -> 32
activation rows, i.e. 8 -> 16 streams with their residuals): qkv 640x1536 38 -> 47, o
1024x640 30 -> 38, gate_up 640x4096 159 -> 192, down 2048x640 46 -> 61; the cost grows with the
rows for every count tried (2 to 64) on these shapes, so rows are not padded, and no kernel is
chosen by row count (a row's sums are exact integers whatever oneDNN picks, so a row's output
stays bitwise the same in any batch). What a 16-row step adds over the GEMMs is the per-row
quantization and rescaling: written in place (quantize_rows' residual path, the add into the
first rows), 72 such linears take 25.5-26.0 instead of 27.1 CPU ms at 16 rows.
"""
from __future__ import annotations

import torch
from torch import nn

from .quantization import QMAX, quantize_per_channel
from .serial import SerialSection

# The residual's scale: the first rounding leaves at most scale / 2 per element, spread over
# the int8 range.
_RESIDUAL_DIVISOR = 2 * QMAX
_TINY = 1e-30  # an all-zero row gets a scale that keeps it zero, never a division by zero
# Rows up to which the per-row quantization and rescaling run on the calling thread alone (a
# decoding step of a few streams); more rows (prompt chunks, larger batches) split them over the
# team. Gemma 3 270M int8 layers per step, best of 5 interleaved, serial against split: quiet
# machine (load ~1) 4 rows 29.4 against 29.4 ms (CPU 43 against 51 ms), 16 rows 44.4 against
# 42.8 (CPU 64 against 71); loaded (load ~3.6) 16 rows 106 against 189. Splitting is kept from
# 5 rows for the quiet server's 16 streams.
SERIAL_QUANTIZE_ROWS = 4


def available() -> bool:
    """oneDNN's int8 linear exists and the CPU multiplies int8 natively (VNNI: without it, the
    u8 x s8 pair sums saturate in int16, and oneDNN would not be exact)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
            and hasattr(torch.ops.onednn, "qlinear_prepack") and _has_vnni())


def _has_vnni() -> bool:
    checks = [getattr(torch.cpu, name, None) for name in ("_is_vnni_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def row_steps(x: torch.Tensor) -> torch.Tensor:
    """[M, K] float -> [M, 1] float32: per row, 1 / the int8 step (symmetric: max|x| -> 127)."""
    # abs().amax(): measured 2-10x faster than vector_norm(inf) or aminmax on [1-32, 640-2048]
    return torch.div(QMAX, x.abs().amax(dim=1, keepdim=True).clamp_(min=_TINY))


RESIDUAL_WEIGHT = 1.0 / _RESIDUAL_DIVISOR  # a residual row's sums count this much


def quantize_rows(flat: torch.Tensor, residual_rows: bool = True,
                  with_error: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """[M, K] float32 -> (int8 rows [M, K], then with `residual_rows` what their rounding left
    [M, K] below them; per row 1 / step [M, 1]; ||x - x_quantized|| [M, 1] when asked). The int8
    sums of a row plus RESIDUAL_WEIGHT times its residual's, divided by 1 / step, are x W_q^T."""
    inverse_step = row_steps(flat)
    if not residual_rows:
        scaled = flat * inverse_step  # in [-127, 127]
        q = scaled.round()
        error = (scaled - q).norm(dim=1, keepdim=True) / inverse_step if with_error else None
        return q.to(torch.int8), inverse_step, error
    both = _rows_and_residuals(flat, inverse_step)
    error = None
    if with_error:  # what both rows together leave, recomputed: the buffer keeps only the rounded
        rows = flat.shape[0]
        left = (flat * inverse_step - both[:rows]) - both[rows:] / _RESIDUAL_DIVISOR
        error = left.norm(dim=1, keepdim=True) / inverse_step
    return both.to(torch.int8), inverse_step, error


def _rows_and_residuals(flat: torch.Tensor, inverse_step: torch.Tensor) -> torch.Tensor:
    """The rounded rows and their residual rows (what the rounding left, times 254: it fits int8
    again), as float32 written in place into one [2M, K] buffer: no cat and no intermediate
    tensors (a decoding step runs this for each of its linears, so the calls count more than the
    arithmetic)."""
    rows = flat.shape[0]
    both = torch.empty(2 * rows, flat.shape[1])
    q, rest = both[:rows], both[rows:]
    torch.mul(flat, inverse_step, out=rest)  # scaled, in [-127, 127]
    torch.round(rest, out=q)
    rest.sub_(q).mul_(_RESIDUAL_DIVISOR).round_()
    return both


class RowInt8Linear(nn.Module):
    """nn.Linear's map (float32 in and out) with int8 weights and per-row int8 activations."""

    def __init__(self, linear: nn.Linear, residual_rows: bool = True,
                 quantized: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        # `quantized`: (int8 [N, K], scales [N]) of this weight made by the caller, not made again
        q, scale = quantized if quantized is not None else quantize_per_channel(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.residual_rows = residual_rows
        # oneDNN's packed int8 weight (opaque; counted as "packed" memory) and its scales
        self.register_buffer("packed_weight", torch.ops.onednn.qlinear_prepack(q, None), persistent=False)
        self.register_buffer("scale", scale.float(), persistent=False)
        self.register_buffer("zero_points", torch.zeros(self.out_features, dtype=torch.long), persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone(),
                                                                  requires_grad=False)

    def _int8_matmul(self, q: torch.Tensor) -> torch.Tensor:
        # int8 [M, K] -> float32 [M, N] = int32 sums * weight scale (elementwise)
        return torch.ops.onednn.qlinear_pointwise(q, 1.0, 0, self.packed_weight, self.scale, self.zero_points,
                                                  None, 1.0, 0, torch.float32, "none", [], "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._project(x.reshape(-1, shape[-1]).float())[0]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def _project(self, flat: torch.Tensor, with_error: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[M, K] float32 -> ([M, N] float32 without bias, per row ||x - x_quantized|| [M, 1] when
        asked: what an error bound needs, layers/int8_head.py)."""
        rows = flat.shape[0]
        # A decoding step's few rows: the elementwise quantization runs on this thread alone,
        # the GEMM with the team (layers/serial.py; SERIAL_QUANTIZE_ROWS).
        with SerialSection(rows <= SERIAL_QUANTIZE_ROWS) as section:
            q, inverse_step, error = quantize_rows(flat, self.residual_rows, with_error)
            sums = section.team(self._int8_matmul, q)  # one pass over the weight for a row and its residual
            if self.residual_rows:  # into the first rows' own memory
                sums = torch.add(sums[:rows], sums[rows:], alpha=RESIDUAL_WEIGHT, out=sums[:rows])
            y = sums.div_(inverse_step)
        return y, error

    def project_with_error(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[M, K] float32 -> (x W_q^T [M, N] float32, ||x - x_q|| per row [M, 1])."""
        return self._project(flat.float(), with_error=True)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 weights, "
                f"per-row int8 activations{' + residual' if self.residual_rows else ''}")


def quantize_row_int8(model: nn.Module, residual_rows: bool = True, skip: set[int] = frozenset()) -> nn.Module:
    """Replaces every CPU float32 nn.Linear (fused projections included) by a RowInt8Linear, in
    place, except the modules whose id() is in `skip`."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if (isinstance(child, nn.Linear) and id(child) not in skip and child.weight.device.type == "cpu"
                    and child.weight.dtype == torch.float32):
                setattr(module, child_name, RowInt8Linear(child, residual_rows))
    return model
