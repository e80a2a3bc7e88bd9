"""The Llama family: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM.

RMSNorm, SwiGLU MLP, grouped-query attention, rotary positions with the scaling variants
(default, linear, dynamic NTK, llama3, yarn), tied or untied embeddings, Qwen2's q/k/v bias
and the sliding window of Mistral (every layer) and Qwen2 (layers past max_window_layers).
Ports transformers/models/llama/modeling_llama.py (LlamaRMSNorm, LlamaRotaryEmbedding,
LlamaAttention, LlamaMLP, LlamaDecoderLayer, LlamaModel, LlamaForCausalLM) and the rope init
functions of transformers/modeling_rope_utils.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..checkpoints.family_config import config_from_dict
from ..checkpoints.formats import Checkpoint
from ..checkpoints.loader import ModuleRecipe, load_module
from ..checkpoints.weights import module_device
from ..errors import ModelLoadFailed
from ..layers.activations import activation
from .causal_lm import CausalLM, run_layers


@dataclass(frozen=True)
class LlamaConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float | None = None
    rope_scaling: dict[str, Any] | None = None
    rope_parameters: dict[str, Any] | None = None  # transformers >= 5 writes rope_theta in here
    partial_rotary_factor: float | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    use_sliding_window: bool | None = None
    max_window_layers: int | None = None
    layer_types: list[str] | None = field(default=None, hash=False)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def rope(self) -> dict[str, Any]:
        """rope_parameters as transformers standardizes them (old rope_scaling + rope_theta)."""
        params = dict(self.rope_parameters or self.rope_scaling or {})
        params.setdefault("rope_type", params.get("type", "default"))
        theta = self.rope_theta if self.rope_theta is not None else 10000.0
        params.setdefault("rope_theta", theta)
        if self.partial_rotary_factor is not None:
            params.setdefault("partial_rotary_factor", self.partial_rotary_factor)
        if params["rope_type"] in ("llama3", "yarn"):
            params.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        return params

    def window(self, layer: int) -> int | None:
        if self.model_type == "mistral":
            return self.sliding_window or None
        if self.model_type == "qwen2":
            if self.layer_types is not None:
                return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None
            if self.use_sliding_window and layer >= (self.max_window_layers or 0):
                return self.sliding_window
        return None


def rope_inv_freq(config: LlamaConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim / 2], attention_factor), ported from modeling_rope_utils' rope init functions."""
    p = config.rope
    kind, base = p["rope_type"], float(p["rope_theta"])
    dim = int(config.dim_per_head * p.get("partial_rotary_factor", 1.0))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if kind == "default":
        return 1.0 / (base ** exponents), 1.0
    if kind == "linear":  # _compute_linear_scaling_rope_parameters
        return 1.0 / (base ** exponents) / p["factor"], 1.0
    if kind == "dynamic":  # _compute_dynamic_ntk_parameters
        seq_len = max(seq_len or 0, config.max_position_embeddings)
        factor = p["factor"]
        base = base * ((factor * seq_len / config.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** exponents), 1.0
    if kind == "llama3":  # _compute_llama3_parameters
        inv_freq = 1.0 / (base ** exponents)
        factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old_len = p["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":  # _compute_yarn_parameters
        return _yarn(p, dim, base, config)
    raise ModelLoadFailed(f"rope_type {kind!r} is not supported; supported: default, linear, dynamic, llama3, yarn",
                          reason="UNSUPPORTED_CONFIG")


def _yarn(p: dict[str, Any], dim: int, base: float, config: LlamaConfig) -> tuple[torch.Tensor, float]:
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or config.max_position_embeddings / original

    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # prevent a singular ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """LlamaRotaryEmbedding, including dynamic NTK's recomputation past the trained length."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.dynamic = config.rope["rope_type"] == "dynamic"
        self.register_buffer("inv_freq", torch.empty(config.dim_per_head // 2), persistent=False)
        self.attention_scaling = 1.0

    def init_buffers(self):
        inv_freq, self.attention_scaling = rope_inv_freq(self.config)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        inv_freq = self.inv_freq
        if self.dynamic:
            seq_len = int(positions.max()) + 1
            if seq_len > self.config.max_position_embeddings:
                inv_freq = rope_inv_freq(self.config, seq_len)[0].to(inv_freq.device)
        freqs = positions[..., None].float() * inv_freq.float()  # [B, T, dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary_pos_emb for x [B, H, T, D]; a partial rotary factor rotates the first dims only."""
    rot = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]
    if rot == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


class RMSNorm(nn.Module):
    """LlamaRMSNorm: normalised in float32, scaled in the input dtype."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Attention(nn.Module):
    """LlamaAttention / MistralAttention / Qwen2Attention."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        h, d = config.hidden_size, config.dim_per_head
        self.n_head, self.kv_heads, self.head_dim = config.num_attention_heads, config.kv_heads, d
        self.layer_idx, self.window = layer_idx, config.window(layer_idx)
        bias = config.qkv_bias
        self.q_proj = nn.Linear(h, self.n_head * d, bias=bias)
        self.k_proj = nn.Linear(h, self.kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, self.kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.n_head * d, h, bias=config.attention_bias)

    def forward(self, x, cos, sin, view):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = view.attend(self.layer_idx, q, k, v, scale=self.head_dim ** -0.5, window=self.window)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """LlamaMLP: SwiGLU."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act = activation(config.hidden_act)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """LlamaDecoderLayer."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, view):
        x = x + self.self_attn(self.input_layernorm(x), cos.to(x.device), sin.to(x.device), view)
        return x + self.mlp(self.post_attention_layernorm(x))


class _LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class LlamaForCausalLM(CausalLM):
    """LlamaForCausalLM (also Mistral and Qwen2, which differ only in config)."""

    # quantization "grouped": a GGUF's own 4-8 bit grids in int4 planes (layers/grid_int4.py)
    post_load = CausalLM.post_load | {"grid_int4"}

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = _LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.num_layers, self.kv_heads = config.num_hidden_layers, config.kv_heads
        self.head_dim, self.max_positions = config.dim_per_head, config.max_position_embeddings
        # Mistral's and Qwen2's sliding layers keep only their window in the KV cache (a ring).
        self.layer_windows = [config.window(i) for i in range(config.num_hidden_layers)]
        if config.rope["rope_type"] in ("dynamic", "linear", "yarn") and config.rope.get("factor"):
            # these scalings exist to stretch the context past the trained length by `factor`
            self.max_positions = int(config.max_position_embeddings * config.rope["factor"])

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden(self, input_ids: torch.Tensor, cache_view=None, last_only: bool = False) -> torch.Tensor:
        view = self.view_or_full(input_ids, cache_view)
        m = self.model
        x = m.embed_tokens(input_ids)
        cos, sin = m.rotary_emb(view.positions.to(input_ids.device), x.dtype)
        # Under a device map a layer may sit on another device than the embedding (layers/device_map.py):
        # the rotary tables follow the hidden state (.to is free when they are already there).
        x = run_layers(m.layers, x, lambda layer, h: layer(h, cos.to(h.device), sin.to(h.device), view),
                       self.layer_devices)
        if last_only:
            x = x[:, -1:]
        x = m.norm(x.to(m.norm.weight.device))
        return x.to(module_device(self.lm_head))


def _rename(name: str) -> str | None:
    if ".rotary_emb." in name:
        return None  # inv_freq of old checkpoints; recomputed from the config
    return name


def load_model(files, options, head: str = "causal_lm") -> nn.Module:
    if head not in ("causal_lm", "base"):
        raise ValueError(f"{files.config.get('model_type')} has no {head!r} head here")

    def recipe(checkpoint: Checkpoint) -> ModuleRecipe:
        config = config_from_dict(LlamaConfig, checkpoint.config)
        return ModuleRecipe(lambda: LlamaForCausalLM(config), rename=_rename,
                            tied={"lm_head.weight": "model.embed_tokens.weight"},
                            ignore_missing=("model.rotary_emb.inv_freq",))

    return load_module(files, options, recipe)
