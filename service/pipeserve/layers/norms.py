"""RMSNorm as Gemma's blocks use it: torch's operators, or pipeserve's native kernel for models
whose weights were quantized (the "native_kernels" pass, layers/passes.py).

torch.rms_norm on a CPU is ~8 operators a call (~8 us for one 640-float row; Gemma 3 270M norms
~90 times a decoding step); kernels/rms_norm.cpp does a call in ~1 us, and adds a post-norm to
the residual stream and norms the sum for the next block in the same call (a decoding step of
the grouped Gemma 3 270M: 23.4 -> 22.4 ms). The two differ in the last bits (the sum of squares
is added in another order), and over 18 layers that moves real Gemma's float32 logits ~1e-4
away from transformers': so the float32 path, whose promise is transformers' numbers, keeps
torch's arithmetic, and the native kernel serves the quantized forms, already further away.
It takes float32 CPU tensors outside autograd; anything else (another dtype or device, a tensor
that needs gradients, a machine where the kernels were not built) takes torch's operators, in
float32 and cast back as Gemma's RMSNorm does.
"""
from __future__ import annotations

import torch

from ..kernels import library


def _native(*tensors: torch.Tensor) -> bool:
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return library.available()


def _torch_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    d = x.shape[-1]
    if scale.dim() == 1:
        if x.dtype == torch.float32:
            return torch.rms_norm(x, (d,), scale, eps)
        return torch.rms_norm(x.float(), (d,), scale, eps).type_as(x)
    # [G, D]: one scale row per group (x.size(-2)), e.g. per attention head
    return torch.rms_norm(x.float(), (d,), None, eps).mul_(scale).type_as(x)


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float, native: bool = False) -> torch.Tensor:
    """(x / rms(x)) * scale over the last dimension, float32 arithmetic; `scale` float32 [D], or
    [G, D] with G = x.size(-2) (each group its own row). A new tensor in x's dtype. `native`:
    on the kernel where it applies."""
    if native and x.stride(-1) == 1 and scale.is_contiguous() and _native(x, scale):
        return torch.ops.pipeserve.rms_norm(x, scale, eps)
    return _torch_norm(x, scale, eps)


def add_rms_norm_(x: torch.Tensor, y: torch.Tensor, post: torch.Tensor, eps: float,
                  pre: torch.Tensor | None = None, native: bool = False) -> torch.Tensor | None:
    """x += rms_norm(y, post) in place; then rms_norm(x, pre) when `pre` is given (else None)."""
    tensors = (x, y, post) if pre is None else (x, y, post, pre)
    if native and x.shape == y.shape and all(t.is_contiguous() for t in tensors) and _native(*tensors):
        out = torch.ops.pipeserve.add_rms_norm_(x, y, post, eps, pre)
        return out if pre is not None else None
    x.add_(_torch_norm(y, post, eps))
    return None if pre is None else _torch_norm(x, pre, eps)
