"""OPT (facebook/opt-125m ... opt-1.3b): learned positions offset by 2, pre- or post-LayerNorm
blocks (opt-350m is post-LN with a 512-wide embedding projected in and out).

Ports transformers/models/opt/modeling_opt.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoints.family_config import config_from_dict
from ..checkpoints.formats import Checkpoint
from ..checkpoints.loader import ModuleRecipe, load_module
from ..checkpoints.weights import module_device
from ..layers.activations import activation
from .causal_lm import CausalLM, run_layers

# OPTLearnedPositionalEmbedding: "OPT is set up so that if padding_idx is specified then offset
# the embedding ids by 2 and adjust num_embeddings appropriately" (fairseq heritage).
POSITION_OFFSET = 2


@dataclass(frozen=True)
class OPTConfig:
    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    _remove_final_layer_norm: bool = False
    word_embed_proj_dim: int | None = None
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 2

    @property
    def embed_dim(self) -> int:
        return self.word_embed_proj_dim or self.hidden_size


class OPTAttention(nn.Module):
    """transformers OPTAttention (q scaled by head_dim ** -0.5)."""

    def __init__(self, config: OPTConfig, layer_idx: int):
        super().__init__()
        e, bias = config.hidden_size, config.enable_bias
        self.n_head, self.head_dim, self.layer_idx = config.num_attention_heads, e // config.num_attention_heads, layer_idx
        self.k_proj = nn.Linear(e, e, bias=bias)
        self.v_proj = nn.Linear(e, e, bias=bias)
        self.q_proj = nn.Linear(e, e, bias=bias)
        self.out_proj = nn.Linear(e, e, bias=bias)

    def forward(self, x, view):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = view.attend(self.layer_idx, q, k, v, scale=self.head_dim ** -0.5)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class OPTDecoderLayer(nn.Module):
    """transformers OPTDecoderLayer."""

    def __init__(self, config: OPTConfig, layer_idx: int):
        super().__init__()
        e, affine = config.hidden_size, config.layer_norm_elementwise_affine
        self.pre_norm = config.do_layer_norm_before
        self.self_attn = OPTAttention(config, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(e, elementwise_affine=affine)
        self.fc1 = nn.Linear(e, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = nn.Linear(config.ffn_dim, e, bias=config.enable_bias)
        self.final_layer_norm = nn.LayerNorm(e, elementwise_affine=affine)
        self.act = activation(config.activation_function)

    def forward(self, x, view):
        if self.pre_norm:
            x = x + self.self_attn(self.self_attn_layer_norm(x), view)
            return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x + self.self_attn(x, view))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class OPTDecoder(nn.Module):
    """transformers OPTDecoder."""

    def __init__(self, config: OPTConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.embed_dim)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, config.hidden_size)
        projected = config.embed_dim != config.hidden_size
        self.project_out = nn.Linear(config.hidden_size, config.embed_dim, bias=False) if projected else None
        self.project_in = nn.Linear(config.embed_dim, config.hidden_size, bias=False) if projected else None
        final_norm = config.do_layer_norm_before and not config._remove_final_layer_norm
        self.final_layer_norm = (nn.LayerNorm(config.hidden_size, elementwise_affine=config.layer_norm_elementwise_affine)
                                 if final_norm else None)
        self.layers = nn.ModuleList(OPTDecoderLayer(config, i) for i in range(config.num_hidden_layers))


class _OPTModel(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        self.decoder = OPTDecoder(config)


class OPTForCausalLM(CausalLM):
    """transformers OPTForCausalLM."""

    def __init__(self, config: OPTConfig):
        super().__init__()
        self.config = config
        self.model = _OPTModel(config)
        self.lm_head = nn.Linear(config.embed_dim, config.vocab_size, bias=False)
        self.num_layers, self.kv_heads = config.num_hidden_layers, config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.max_positions = config.max_position_embeddings

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def hidden(self, input_ids: torch.Tensor, cache_view=None, last_only: bool = False) -> torch.Tensor:
        view = self.view_or_full(input_ids, cache_view)
        d = self.model.decoder
        x = d.embed_tokens(input_ids)
        if d.project_in is not None:
            x = d.project_in(x)
        x = x + d.embed_positions(view.positions.to(input_ids.device) + POSITION_OFFSET)
        x = run_layers(d.layers, x, lambda layer, h: layer(h, view), self.layer_devices)
        if last_only:
            x = x[:, -1:]
        x = x.to(module_device(self.lm_head))
        if d.final_layer_norm is not None:
            x = d.final_layer_norm(x)
        if d.project_out is not None:
            x = d.project_out(x)
        return x


def _rename(name: str) -> str | None:
    if name.startswith("decoder."):
        return "model." + name  # OPTModel checkpoints and some early OPTForCausalLM ones
    return name


def load_model(files, options, head: str = "causal_lm") -> nn.Module:
    if head not in ("causal_lm", "base"):
        raise ValueError(f"opt has no {head!r} head here")

    def recipe(checkpoint: Checkpoint) -> ModuleRecipe:
        config = config_from_dict(OPTConfig, checkpoint.config)
        return ModuleRecipe(lambda: OPTForCausalLM(config), rename=_rename,
                            tied={"lm_head.weight": "model.decoder.embed_tokens.weight"})

    return load_module(files, options, recipe)
