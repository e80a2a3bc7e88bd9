"""What the decoder-only families (gpt2, opt, llama) share: the forward-pass contract the
generation engine relies on, the layer loop that follows a device map, and the speed passes the
family accepts (int8 weights, a device map, a column-major output projection: applied from
outside by layers/passes.py)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..layers.kv_cache import FullAttention


class CausalLM(nn.Module):
    """Contract of every decoder family's causal_lm module.

    forward(input_ids [B, T], cache_view=None, last_only=False) -> logits [B, T or 1, V] (float32).
    `cache_view` is a kv_cache.CacheView (positions come from it) or None for one uncached causal
    pass from position 0. Families implement `hidden` (the same arguments -> the input of
    `lm_head`, on its device). Attributes the engine reads: num_layers, kv_heads, head_dim,
    max_positions, `layer_devices` (set by device_map; else all on the embedding's device) and,
    when the pipeline installed one, `verified_head` (a submodule: layers/verified_head.py), and
    `layer_windows` (per layer, the sliding window or None; the KV cache keeps only the window of
    a sliding layer; None for all means every layer attends to the whole prefix).
    """

    num_layers: int
    kv_heads: int
    head_dim: int
    max_positions: int
    layer_devices: list[torch.device] | None = None
    layer_windows: list[int | None] | None = None
    # The post-load passes (layers/passes.py) that only some families take: int8 weights, a
    # device map over the decoder layers, a column-major CPU output projection.
    post_load = frozenset({"int8", "device_map", "column_major_head"})

    def forward(self, input_ids: torch.Tensor, cache_view=None, last_only: bool = False) -> torch.Tensor:
        return self.finish_logits(self.lm_head(self.hidden(input_ids, cache_view, last_only)).float())

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """What the family does to the output projection's scores (Gemma's soft cap); the
        engine applies it to every score it reads from the head."""
        return logits

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
