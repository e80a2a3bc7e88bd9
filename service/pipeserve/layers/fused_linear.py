"""Sibling projections that read the same input (attention's q, k and v; a gated MLP's gate
and up) fused into one nn.Linear at load: one GEMM per group instead of two or three.

A decoding step at batch 1 is made of many small operators, where each call's fixed cost
(dispatch, oneDNN/fbgemm setup, threads waking) is a large part of its time; Gemma 3 270M
runs 7 projections per layer over 18 layers. Stacking the weights row-wise computes the same
output rows with the same arithmetic (each output row is the same dot product), so the fused
layer equals the parts up to the kernel's summation order.

The fused weight REPLACES the parts (they are removed from their owner), so memory does not
grow; the result is an ordinary nn.Linear, so every later pass (float16 storage, int8 with a
scale per output row, oneDNN packing) treats it like any other linear. The checkpoint keeps its
names: loading happens before this pass, and the family's forward reads either form.

A family lists its groups with `fusable_projections()` -> [(owner, (part names...), fused name)]
and opts in with "fuse_projections" in its `post_load` (models/causal_lm.py).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def fuse_linears(owner: nn.Module, parts: Sequence[str], fused: str, *, missing_bias_as_zeros: bool = False) -> bool:
    """owner.<fused> = one nn.Linear whose rows are the parts' rows in order; the parts are
    removed. Leaves the owner as it is (-> False) unless every part is a plain nn.Linear with
    the same input size, dtype and device, and all or none have a bias; with
    `missing_bias_as_zeros` a part without one contributes zeros (Whisper's k projection)."""
    linears = [getattr(owner, name, None) for name in parts]
    if not linears or any(type(linear) is not nn.Linear for linear in linears):
        return False
    first = linears[0].weight
    if any(l.weight.shape[1] != first.shape[1] or l.weight.dtype != first.dtype or l.weight.device != first.device
           for l in linears):
        return False
    biased = [l.bias is not None for l in linears]
    if any(biased) and not all(biased) and not missing_bias_as_zeros:
        return False
    with torch.no_grad():
        weight = torch.cat([l.weight.detach() for l in linears])  # [sum(out), in]
        bias = torch.cat([l.bias.detach() if l.bias is not None else l.weight.new_zeros(l.out_features)
                          for l in linears]) if any(biased) else None
    for name in parts:
        delattr(owner, name)  # the parts' weights go with them: no second copy stays resident
    # On the meta device: nn.Linear's own initial weight would be a throwaway allocation.
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    setattr(owner, fused, linear)
    return True


def fuse_projections(model: nn.Module) -> int:
    """Fuses every group the model lists; -> how many groups were fused."""
    return sum(fuse_linears(owner, parts, fused) for owner, parts, fused in model.fusable_projections())
