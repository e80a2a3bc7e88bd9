"""What the decoder-only families (gpt2, opt, llama) share: config parsing, activations, the
forward-pass contract the generation engine relies on, and loading (dtype, device or device
map, int8)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelLoadFailed
from ..layers.kv_cache import FullAttention
from ..layers.packed_linear import supported

# transformers.activations.ACT2FN names -> functions.
ACT2FN: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def activation(name: str):
    if name not in ACT2FN:
        raise ModelLoadFailed(f"activation {name!r} is not supported; supported: {sorted(ACT2FN)}",
                              reason="UNSUPPORTED_CONFIG")
    return ACT2FN[name]


def config_from_dict(cls, config: Mapping[str, Any]):
    """The frozen config dataclass from config.json, ignoring fields we do not use."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in names})


class CausalLM(nn.Module):
    """Contract of every decoder family's causal_lm module.

    forward(input_ids [B, T], cache_view=None, last_only=False) -> logits [B, T or 1, V] (float32).
    `cache_view` is a kv_cache.CacheView (positions come from it) or None for one uncached causal
    pass from position 0. Families implement `hidden` (the same arguments -> the input of
    `lm_head`, on its device). Attributes the engine reads: num_layers, kv_heads, head_dim,
    max_positions, `layer_devices` (set by device_map; else all on the embedding's device) and,
    when the pipeline installed one, `verified_head` (a submodule: layers/verified_head.py).
    """

    num_layers: int
    kv_heads: int
    head_dim: int
    max_positions: int
    layer_devices: list[torch.device] | None = None

    def forward(self, input_ids: torch.Tensor, cache_view=None, last_only: bool = False) -> torch.Tensor:
        return self.lm_head(self.hidden(input_ids, cache_view, last_only)).float()

    def view_or_full(self, input_ids: torch.Tensor, cache_view):
        if cache_view is None:
            return FullAttention(input_ids.shape[0], input_ids.shape[1], input_ids.device)
        return cache_view

    def cache_devices(self) -> list[torch.device]:
        if self.layer_devices:
            return list(self.layer_devices)
        device = next(self.parameters()).device
        return [device] * self.num_layers

    def cache_dtype(self) -> torch.dtype:
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32


def run_layers(layers: nn.ModuleList, hidden: torch.Tensor, call: Callable[[nn.Module, torch.Tensor], torch.Tensor],
               devices: list[torch.device] | None) -> torch.Tensor:
    """Runs decoder layers in order, moving the hidden state across devices under a device map."""
    for index, layer in enumerate(layers):
        if devices is not None and hidden.device != devices[index]:
            hidden = hidden.to(devices[index])
        hidden = call(layer, hidden)
    return hidden


def load_causal_lm(files, options, build: Callable[[], nn.Module], *,
                   rename: Callable[[str], str | None], tied: Mapping[str, str] | None = None,
                   transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
                   ignore_missing=()) -> nn.Module:
    """Builds on the options' device/dtype, loads the checkpoint strictly, then applies int8 and
    the device map. device "auto" plans a device map over visible GPUs then CPU."""
    from ..checkpoints.weights import assign, empty_module, load_state_dict

    dtype = options.torch_dtype
    auto = options.device == "auto"
    device = "cpu" if auto else options.device
    model = empty_module(build, device=device, dtype=dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # one storage for embedding and output projection when tied
    state = load_state_dict(files.path, device=device, dtype=dtype, allow_pickle=options.allow_pickle)
    if transform is not None:
        state = transform(state)
    assign(model, state, rename=rename, tied=tied, ignore_missing=ignore_missing)
    del state
    if options.load_in_8bit:
        from ..layers.quantization import quantize_int8

        # A tied lm_head gets its own int8 copy: decoding reads it every step, the embedding
        # only gathers rows, so the copy buys bandwidth for little memory.
        quantize_int8(model)
    if auto:
        from ..layers.device_map import dispatch

        dispatch(model)
    head = getattr(model, "lm_head", None)
    if not (options.packed_linear and isinstance(head, nn.Linear) and supported(head.weight)):
        # A head about to be packed (runtime/loading.py) gets oneDNN's own layout: a column-major copy
        # would be thrown away and leave the tied embedding strided.
        column_major_head(model)
    return model.eval()


def column_major_head(model: nn.Module) -> None:
    """Stores a float lm_head's weight [vocab, hidden] column-major on CPU (a transposed view
    of a contiguous [hidden, vocab] tensor), in place of the row-major one, sharing it with a tied
    embedding. Same values and shape, no extra memory: linear then runs as one x @ W^T GEMM
    over contiguous memory, which measured 8.1 -> 5.3 ms per token at batch 1 and 44 -> 36 ms
    at batch 16 for GPT-2's 50257 x 768 head on our 2-core CPUs (row-major gemv is slower);
    embedding lookups read the strided rows just as well."""
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear or head.weight.device.type != "cpu" or not head.weight.is_floating_point():
        return
    old = head.weight
    if old.t().is_contiguous():
        return
    new = nn.Parameter(old.detach().t().contiguous().t(), requires_grad=old.requires_grad)
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is old:
                module._parameters[name] = new

