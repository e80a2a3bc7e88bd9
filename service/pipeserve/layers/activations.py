"""The one activation table: config.json activation names (transformers.activations.ACT2FN
keys) -> functions, and the oneDNN post-op that computes the same function inside a packed
linear (layers/packed_linear.linear_activation).

Every family reads its `hidden_act` / `activation_function` / `feat_extract_activation` through
`activation(name)`, so a name is accepted by all families or by none, and an unknown name fails
the load the same way everywhere: ModelLoadFailed with reason UNSUPPORTED_CONFIG.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import ModelLoadFailed

Activation = Callable[[torch.Tensor], torch.Tensor]


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACT2FN: dict[str, Activation] = {
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}

# The entries oneDNN can fuse into a linear as a post-op: name -> (post-op, algorithm). Each is
# bit-identical to ACT2FN's function on the linear's output (tests/test_packed_linear.py).
ONEDNN_POST_OPS: dict[str, tuple[str, str]] = {
    "gelu": ("gelu", "none"),
    "gelu_new": ("gelu", "tanh"),
    "gelu_pytorch_tanh": ("gelu", "tanh"),
    "gelu_fast": ("gelu", "tanh"),
    "relu": ("relu", ""),
}


def activation(name: str) -> Activation:
    """The function config.json's activation `name` stands for; UNSUPPORTED_CONFIG if none."""
    if name not in ACT2FN:
        raise ModelLoadFailed(f"activation {name!r} is not supported; supported: {', '.join(sorted(ACT2FN))}",
                              reason="UNSUPPORTED_CONFIG")
    return ACT2FN[name]
