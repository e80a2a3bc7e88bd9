"""Conv1D, the linear layer GPT-2's checkpoints store transposed (weight [in, out], y = x @ W + b).

A building block, not a family: it lives with the kernels so that the passes that rewrite linear
layers (packed_linear, quantization) can recognise it without importing a model family (that
import made loading BERT import GPT-2, and closed the cycle packed_linear -> gpt2 -> causal_lm
-> packed_linear).
"""
from __future__ import annotations

import torch
from torch import nn


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D: a linear layer with its weight stored [in, out]."""

    def __init__(self, nx: int, nf: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.empty(nf))

    def forward(self, x):
        shape = x.shape[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(shape)

    def to_linear(self) -> nn.Linear:
        """The same map as an nn.Linear (for int8 quantization)."""
        linear = nn.Linear(self.weight.shape[0], self.weight.shape[1], device=self.weight.device,
                           dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight.t())
            linear.bias.copy_(self.bias)
        return linear
