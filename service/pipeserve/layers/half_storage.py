"""Weights stored in float16, computed in float32: LoadOptions.weights_dtype = "float16".

A CTranslate2 Whisper file stores float16; the default float32 model is those values widened,
held twice as large (and packed, and screened: layers/packed_linear.py, verified_head.py).
This mode keeps the linear and embedding weights in float16 (for a CTranslate2 file: views of
its mapping, no private copy at all) and widens them to float32 just before each product, so
every product multiplies the very values the float32 model holds, in float32: the arithmetic
differs from the float32 model's only by the kernels' summation order (plain F.linear here,
oneDNN packed there). Everything else (norms, convolutions, biases, computed tables) becomes
float32: small, and read in float32 by the model as it is.

The cost is time: every call widens the weights it reads (a decoding step the decoder's
linears and the vocabulary projection), and the dense float32 kernel replaces the packed one.
The tied vocabulary projection is widened a block of rows at a time so that the transient
stays a few MB instead of a float32 copy of the head, and every widening writes into one
scratch buffer per thread: a fresh tensor per product would be a fresh mapping (blocks past
the heap's mmap threshold, runtime/heap.py) whose pages fault in on every decoding step.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

STORAGE_DTYPES = {"float16": torch.float16}
# A weight with more rows than this (a vocabulary projection) is widened ROW_BLOCK rows at a
# time: 1024 x 384 float32 = 1.5 MiB stays in the L2 cache from the widening to the product
# (Whisper tiny's head, one row, CPU time per projection: 4096-row blocks 14-15 ms, 1024
# 8.5-12 ms on our loaded 2 cores). Smaller layers are widened whole: splitting their output
# would add a strided copy of it (the encoder's 1500 rows).
WHOLE_ROWS = 4096
ROW_BLOCK = 1024


_scratch = threading.local()


def _widened(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` converted to `dtype` in this thread's scratch buffer (valid until the thread's
    next call: each product finishes before the next layer widens its weight)."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < weight.numel() or buffer.dtype != dtype or buffer.device != weight.device:
        buffer = _scratch.buffer = torch.empty(max(weight.numel(), ROW_BLOCK * weight.shape[-1]), dtype=dtype,
                                               device=weight.device)
    return buffer[:weight.numel()].view(weight.shape).copy_(weight)


class HalfStorageLinear(nn.Module):
    """nn.Linear's map over a float16 `weight` [out, in] (shared with a tied embedding where
    it is one) and a float32 bias: x @ float32(weight)^T + bias, in float32."""

    def __init__(self, weight: nn.Parameter, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_features <= WHOLE_ROWS:
            return F.linear(x, _widened(self.weight, x.dtype), self.bias)
        out = x.new_empty(*x.shape[:-1], self.out_features)
        for start in range(0, self.out_features, ROW_BLOCK):
            rows = slice(start, start + ROW_BLOCK)
            out[..., rows] = F.linear(x, _widened(self.weight[rows], x.dtype),
                                      None if self.bias is None else self.bias[rows])
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=float16"


class HalfStorageEmbedding(nn.Module):
    """nn.Embedding's lookup over a float16 table: the rows gathered, then widened."""

    def __init__(self, weight: nn.Parameter, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.weight, self.padding_idx = weight, padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx).float()


def keep_half_storage(model: nn.Module, storage: torch.dtype = torch.float16,
                      compute: torch.dtype = torch.float32) -> int:
    """Makes a model built in `storage` compute in `compute`: each nn.Linear and nn.Embedding
    keeps its `storage` weight (one Parameter, so a tied head and its embedding still share
    it), every other floating tensor is converted to `compute`. -> how many layers keep it."""
    kept: set[int] = set()
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == storage:
                setattr(parent, name, HalfStorageLinear(child.weight, child.bias))
            elif type(child) is nn.Embedding and child.weight.dtype == storage:
                setattr(parent, name, HalfStorageEmbedding(child.weight, child.padding_idx))
            else:
                continue
            kept.add(id(child.weight))
            count += 1
    with torch.no_grad():
        for module in model.modules():
            for tensors in (module._parameters, module._buffers):
                for key, tensor in tensors.items():
                    if tensor is not None and tensor.is_floating_point() and id(tensor) not in kept \
                            and tensor.dtype != compute:
                        converted = tensor.to(compute)
                        tensors[key] = (nn.Parameter(converted, requires_grad=False)
                                        if isinstance(tensor, nn.Parameter) else converted)
    return count
