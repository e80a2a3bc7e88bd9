"""Where a model's resident bytes go, by kind, each storage counted once:

    weights    parameters and buffers in the model's own layout (dense, int8, column-major)
    packed     oneDNN-packed weights (layers/packed_linear.py) that replaced or joined them
    screening  the verified head's derived tensors (bfloat16 head, exact timestamp rows;
               layers/verified_head.py); the float32 weight it reads is the model's own
    cache      caches a pipeline holds (a generation engine's KV cache), added by the pipeline

The kinds sum to the bytes the manager's memory budget counts (ModelInfo.bytes), so an
operator sees which copy costs what and the budget and the breakdown never disagree.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .verified_head import VerifiedHead

KINDS = ("weights", "packed", "screening", "cache")


def _nbytes(tensor: torch.Tensor, seen: set[int]) -> int:
    if tensor.is_mkldnn:  # an opaque packed tensor has no storage to ask (and is never shared)
        return tensor.numel() * tensor.element_size()
    storage = tensor.untyped_storage()
    if storage.data_ptr() in seen:
        return 0
    seen.add(storage.data_ptr())
    return storage.nbytes()


def module_memory(modules: Iterable[nn.Module]) -> dict[str, int]:
    """Resident bytes of `modules` by kind (all of KINDS, zeros included); a storage shared
    between tensors or modules (a tied head) is counted once, under the first kind met."""
    usage = dict.fromkeys(KINDS, 0)
    seen: set[int] = set()
    for module in modules:
        for owner in module.modules():
            direct = [*owner._parameters.values(), *owner._buffers.values()]
            for tensor in direct:
                if tensor is None:
                    continue
                kind = ("screening" if isinstance(owner, VerifiedHead) or getattr(owner, "memory_kind", "") == "screening"
                        else "packed" if tensor.is_mkldnn else "weights")
                usage[kind] += _nbytes(tensor, seen)
    return usage
