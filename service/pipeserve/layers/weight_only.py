"""Weight-only int8 linears for CPU float32 models: int8 weights with one scale per output
channel, activations rounded to bfloat16 (not quantized), through torch's weight-only kernel
aten._weight_int8pack_mm.

Why not fbgemm's dynamic int8 (layers/quantization.py's CPU default): it quantizes activations
to 7 bits per call, and on Gemma 3's large activations that moved the greedy choice on a quarter
of the steps. Why bfloat16 activations: the same kernel with float32 activations runs 8x slower
on the build machine (cpu-head-kernels notes: 104.6 vs 12.7 ms for a 262k x 640 head), while with
bfloat16 ones it streams the int8 weight at memory speed. Where oneDNN has no native bfloat16
(no AVX512-BF16/AMX) the layers keep the fbgemm path (`available`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantization import quantize_per_channel


# From this many rows on, a call widens its int8 weight to bfloat16 for oneDNN's GEMM (they are
# equally fast near 8 rows, the int8 kernel 5-10x faster at 1), unless the weight is larger than
# BATCHED_MAX_WEIGHTS (a 262k-row head's bfloat16 copy would be 336 MB per call).
BATCHED_ROWS = 8
BATCHED_MAX_WEIGHTS = 1 << 24


def available(weight: torch.Tensor) -> bool:
    """A CPU float32 weight, torch's weight-only int8 kernel, and native bfloat16 (the kernel's
    fast path: the activations are bfloat16)."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32
            and hasattr(torch.ops.aten, "_weight_int8pack_mm") and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class WeightOnlyInt8Linear(nn.Module):
    """nn.Linear's map (float32 in, float32 out) with int8 per-channel weights and bfloat16
    activations. `weight`/`scale` are the int8 form (buffers: the state dict keeps the float
    checkpoint's names for the float path only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = quantize_per_channel(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale.to(torch.bfloat16))  # the kernel's scale dtype = activations'
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone(),
                                                                  requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).bfloat16()
        if flat.shape[0] >= BATCHED_ROWS and self.weight.numel() <= BATCHED_MAX_WEIGHTS:
            # Many rows (a prompt pass): the int8 kernel turns compute-bound; a bfloat16 GEMM on
            # the weight widened for this call ran 2x faster at 33 rows (Gemma's block shapes).
            y = F.linear(flat, self.weight.to(torch.bfloat16)).to(x.dtype) * self.scale.to(x.dtype)
        else:
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scale).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def int8_form(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 weight [out, in], bfloat16 scales [out]): what an int8 screen of the same head reuses."""
        return self.weight, self.scale

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only, bf16 activations"


def quantize_weight_only(model: nn.Module) -> nn.Module:
    """Replaces every CPU float32 nn.Linear by a WeightOnlyInt8Linear, in place. A Linear tied to
    an embedding gets its own int8 copy (the embedding keeps gathering float32 rows)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and available(child.weight):
                setattr(module, child_name, WeightOnlyInt8Linear(child))
    return model
