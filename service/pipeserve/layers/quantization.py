"""Native int8 weight-only quantization (the `load_in_8bit` use case, without bitsandbytes).

Each nn.Linear becomes an Int8Linear: weights rounded to int8 with one float scale per output
channel (symmetric, scale = max|w_row| / 127), activations stay in the model's dtype. Decoding
at batch 1 reads every weight once per token, so a quarter of float32's bytes is up to 4x
less memory traffic. On GPUs the matmul is torch's int8 weight-only kernel
(torch._weight_int8pack_mm), with on-the-fly dequantization where it is missing.

On CPU that weight-only kernel is compute-bound (measured 3-4x slower than float32 matmul on
this project's x86 machines), so float32 CPU models use fbgemm's int8 linear instead: the same
per-channel int8 weights, with activations quantized per call (dynamic quantization). That is
not weight-only (activation rounding adds ~1% relative error on logits) and it keeps fbgemm's
packed copy beside the int8 tensor (2 bytes per weight, still half of float32); pass
kernel="weight_only" to keep exact weight-only semantics.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# int8's symmetric range: -127..127 (-128 unused so that negation is exact).
QMAX = 127


# Rows quantized per slice: the float temporaries stay a few MiB however large the weight (a
# 262k-row output projection would otherwise need several float32 copies of itself at once).
_SLICE_ELEMENTS = 1 << 20


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (int8 [out, in], float32 scales [out])."""
    w = weight.detach()
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    step = max(1, _SLICE_ELEMENTS // max(1, w.shape[1]))
    for start in range(0, w.shape[0], step):
        rows = w[start:start + step].float()
        row_scale = rows.abs().amax(dim=1).clamp(min=1e-12) / QMAX
        q[start:start + step] = torch.round(rows / row_scale[:, None]).clamp(-QMAX, QMAX)
        scale[start:start + step] = row_scale
    return q, scale


def _fbgemm_pack(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    try:
        zero = torch.zeros(q.shape[0], dtype=torch.long)
        qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
        return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.float())
    except (RuntimeError, AttributeError):
        return None


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear, kernel: str = "auto"):
        super().__init__()
        q, scale = quantize_per_channel(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self._packed_ok = True
        self._fbgemm = None
        if kernel == "auto" and q.device.type == "cpu" and linear.weight.dtype == torch.float32:
            self._fbgemm = _fbgemm_pack(q, scale, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if self._fbgemm is not None and x.device.type == "cpu" and x.dtype == torch.float32:
            # reduce_range: 7-bit activations so that fbgemm's int16 accumulation cannot overflow
            y = torch.ops.quantized.linear_dynamic(flat.contiguous(), self._fbgemm, True)
            return y.reshape(*shape[:-1], self.out_features)
        y = None
        if self._packed_ok:
            try:
                y = torch._weight_int8pack_mm(flat, self.weight, self.scale.to(x.dtype))
            except (RuntimeError, NotImplementedError, AttributeError):
                self._packed_ok = False  # no kernel for this device/dtype: dequantize instead
        if y is None:
            y = F.linear(flat, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8(model: nn.Module, skip: tuple[str, ...] = (), kernel: str = "auto") -> nn.Module:
    """Replaces every nn.Linear (except names in `skip`) by an Int8Linear, in place. A Linear
    whose weight is tied to an embedding gets its own int8 copy; the embedding stays as is."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if full in skip:
                continue
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear(child, kernel))
            elif callable(getattr(child, "to_linear", None)):  # e.g. GPT-2's Conv1D ([in, out] weight)
                setattr(module, child_name, Int8Linear(child.to_linear(), kernel))
    return model
