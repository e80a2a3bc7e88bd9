"""Linear layers on CPU through oneDNN with the weight reordered ("prepacked") once at load.

`F.linear` on CPU hands MKL a row-major weight; at the batch sizes inference runs (1 token per
sequence while decoding, a few dozen rows for small requests) that path reads the weight at
about half the machine's memory bandwidth. oneDNN's linear on a weight reordered into its
blocked layout (the kernel torch.compile's CPU backend uses after freezing) streams it at
close to full bandwidth, measured on our 2-core build machine:

    weight            rows  F.linear  packed
    51864 x 384  (Whisper head)   1     6.2 ms    1.0 ms
    50257 x 768  (GPT-2 head)     1     9.1 ms    3.0 ms
    50257 x 768                  16    19.4 ms    4.6 ms
    3072 x 768   (GPT-2 MLP)      1     0.55 ms   0.14 ms

The arithmetic is float32 (or bfloat16) as before; only the summation order differs, so
outputs move by float rounding (~1e-6 relative), well inside the 1e-4 parity bound.

`pack_linears` swaps every `nn.Linear` (and GPT-2's `Conv1D`) of a CPU float32/bfloat16 model
for a `PackedLinear` holding only the packed weight, so memory does not grow, except where
the dense weight is shared with an embedding (tied output projections): the embedding keeps
gathering rows from the dense copy and the head gets its own packed one.

Few rows (`dense_rows`, a family's opt-in: layers/passes.py "few_rows_dense"): with torch 2.13
(oneDNN 3.12's brgemm inner product, MKL 2024.2) the table above no longer holds at 1-3 rows:
MKL's GEMV over the dense row-major weight beats the packed kernel. Gemma 3 270M's 72 float32
block linears in a decoding step (layers only, 2 threads, our shared 2-core Xeon, best of 5
interleaved): 1 row 26.8 ms with F.linear against 40.7 ms packed; 16 rows 63.0 against 53.1
(microbench of the same 72 shapes: F.linear faster up to 3 rows, packed from 4). A layer that
opts in keeps its dense weight beside the packed one (the float32 block linears' bytes again:
+400 MB on Gemma 3 270M; none for a tied head, whose dense weight is the embedding's) and
takes F.linear up to `dense_rows` rows. Both are float32 arithmetic with their own summation
order: outputs differ by float rounding, and a given row count always takes the same kernel
(deterministic).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .activations import ONEDNN_POST_OPS
from .conv1d import Conv1D
from .head_layout import store_column_major

_DTYPES = (torch.float32, torch.bfloat16)

# Rows up to which an opted-in layer takes MKL's F.linear over its dense weight (module doc:
# faster up to 3 rows on Gemma 3 270M's shapes, packed from 4).
DENSE_ROWS = 3


def supported(weight: torch.Tensor) -> bool:
    """The packed kernel exists for this weight: CPU, float32/bfloat16, a torch with oneDNN."""
    return (weight.device.type == "cpu" and weight.dtype in _DTYPES and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedLinear(nn.Module):
    """`nn.Linear`'s map with the weight in oneDNN's layout (not in state_dict: it is derived)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dense_rows: int = 0):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # No batch-size hint: measured fastest from 1 row to hundreds (a hint of 1 is 1.5-2x
        # slower at 5+ rows).
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight.detach()), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        # Up to `dense_rows` rows, F.linear over the dense weight (module doc); it is derived
        # state like `packed`, so not in state_dict either.
        # Float32 only: MKL has no bfloat16 GEMV (F.linear would be slower there, not faster).
        self.dense_rows = dense_rows if weight.dtype == torch.float32 else 0
        self.register_buffer("dense_weight", weight.detach() if self.dense_rows > 0 else None, persistent=False)

    def forward(self, x: torch.Tensor, activation: str = "none", algorithm: str = "") -> torch.Tensor:
        """`activation` is a oneDNN post-op computed on the output tile while it is in cache
        ("gelu" with algorithm "none" (erf) or "tanh", "relu"): bit-identical to the separate
        torch op here, without another pass over the output (Whisper's encoder fc1: 4.2 -> 3.4 ms)."""
        if self.dense_rows and activation == "none" and x.numel() <= self.dense_rows * self.in_features:
            return F.linear(x, self.dense_weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, activation, [], algorithm)

    def extra_repr(self) -> str:
        few = f", F.linear up to {self.dense_rows} rows" if self.dense_rows else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{few}"


def linear_activation(linear: nn.Module, x: torch.Tensor, name: str,
                      fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """fn(linear(x)) where `fn` is the activation called `name` (transformers' config name);
    one kernel when `linear` is packed and oneDNN has that activation as a post-op."""
    if isinstance(linear, PackedLinear) and name in ONEDNN_POST_OPS:
        return linear(x, *ONEDNN_POST_OPS[name])
    return fn(linear(x))


def _dense_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [out, in], bias) of a module computing x @ W^T + b, or None for other modules."""
    if type(module) is nn.Linear:
        return module.weight, module.bias
    if type(module) is Conv1D:  # GPT-2: weight [in, out]
        return module.weight.t(), module.bias
    return None


def packable(model: nn.Module) -> bool:
    """The model has a linear layer pack_linears would replace."""
    return any(found is not None and supported(found[0]) for found in map(_dense_weight, model.modules()))


def embedding_weights(model: nn.Module) -> set[int]:
    """ids of the weights the model's embeddings gather rows from."""
    return {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}


def pack_linears(model: nn.Module, share_tied: bool = False, dense_rows: int = 0) -> int:
    """Replaces the model's eligible linear layers with PackedLinear in place; -> how many.

    share_tied: a linear whose weight an embedding shares (a tied head) is not packed but
    keeps that one weight, stored column-major (head_layout.store_column_major): for a family
    whose greedy steps read a screened head (layers/verified_head.py), a packed float32 copy
    beside the dense one costs the whole head's size again (Whisper tiny: 76 MiB, half the
    model) for the steps that are not greedy, where a column-major GEMM is about as fast as
    the packed one (51864 x 384, 1-16 rows, measured within the noise of our loaded 2-core
    machine) and the embedding reads the strided rows as before.

    dense_rows: each packed layer also keeps its dense weight and takes F.linear up to that
    many rows (module doc; 0: packed only)."""
    count = 0
    tied = embedding_weights(model) if share_tied else set()
    # (parent, name) slots, not the modules: a list of modules would keep every replaced layer
    # and its dense weight alive until the end (a load peak of the whole model's linears again).
    slots = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
             if _dense_weight(child) is not None]
    for parent, name in slots:
        child = getattr(parent, name)
        found = _dense_weight(child)
        if not supported(found[0]):
            continue
        if type(child) is nn.Linear and id(child.weight) in tied:
            store_column_major(child.weight)
            continue
        # The dense weight goes with `child` unless an embedding shares it.
        setattr(parent, name, PackedLinear(*found, dense_rows=dense_rows))
        count += 1
    return count

