"""The Gemma 3 text family: Gemma3ForCausalLM (model_type gemma3_text) and the language model of
Gemma3ForConditionalGeneration checkpoints (model_type gemma3; the vision tower is not loaded).

What sets it apart from Llama: the token embeddings are scaled by sqrt(hidden_size) (in the
embedding's dtype), RMSNorm scales by (1 + weight) in float32, queries and keys are RMS-normed
per head, each block has a norm before and after both attention and MLP, the MLP is gated GELU
(tanh), attention scores are scaled by query_pre_attn_scalar^-0.5, and the layers alternate between sliding-window ("sliding_attention", RoPE base
rope_local_base_freq) and global ("full_attention", RoPE base rope_theta plus rope_scaling)
attention. The output projection is tied to the embedding; the logits may be tanh-softcapped.
attn_logit_softcapping is read but, as in transformers' Gemma3Attention (which does not pass it to
the attention function: Gemma 3 replaced Gemma 2's score soft cap with the q/k norms), not applied.

Ports transformers/models/gemma3/modeling_gemma3.py (Gemma3TextScaledWordEmbedding, Gemma3RMSNorm,
Gemma3MLP, Gemma3Attention, Gemma3DecoderLayer, Gemma3TextModel, Gemma3ForCausalLM) and the rope
parameters of configuration_gemma3.py (Gemma3TextConfig.convert_rope_params_to_dict). RoPE itself
is Llama's (models/llama.py) with each layer type's parameters.

Quantized forms switch the norms and a decoding step's attention block to pipeserve's kernels
(`native_kernels`, layers/norms.py, kv_cache.attend_step_native); the float path keeps torch's
arithmetic, transformers' to the bit in the norms.

Longer than 450 lines: the family's config with its rope and window rules, its modules, its
rotary tables and its checkpoint table stay one module, as each family's do (models/); the
native step is one branch in Attention.forward and one switch per module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.family_config import config_from_dict
from ..checkpoints.formats import Checkpoint
from ..checkpoints.loader import ModuleRecipe, load_module
from ..checkpoints.weights import module_device
from ..errors import ModelLoadFailed
from ..layers import norms
from ..layers.activations import activation
from .causal_lm import CausalLM, run_layers
from .llama import LlamaConfig, RotaryEmbedding

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class Gemma3TextConfig:
    """Gemma3TextConfig's fields (transformers' names and defaults)."""

    model_type: str = "gemma3_text"
    vocab_size: int = 262_208
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | None = 1
    bos_token_id: int | None = 2
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    sliding_window_pattern: int = 6
    layer_types: tuple[str, ...] | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None  # not applied, as in transformers (module docstring)
    use_bidirectional_attention: bool = False
    # RoPE: transformers >= 5 writes rope_parameters {"sliding_attention": {...}, "full_attention": {...}};
    # older configs write rope_theta (global), rope_local_base_freq (sliding) and rope_scaling (global).
    rope_parameters: dict[str, Any] | None = None
    rope_theta: float | None = None
    rope_local_base_freq: float | None = None
    rope_scaling: dict[str, Any] | None = None

    def layer_type(self, layer: int) -> str:
        if self.layer_types is not None:
            return self.layer_types[layer]
        # Gemma3TextConfig.__post_init__: every sliding_window_pattern-th layer is global
        return SLIDING if (layer + 1) % self.sliding_window_pattern else FULL

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_type(layer) == SLIDING else None

    def rope(self, layer_type: str) -> dict[str, Any]:
        """One layer type's rope parameters, as convert_rope_params_to_dict standardizes them."""
        nested = self.rope_parameters or {}
        params = dict(nested.get(layer_type) or {"rope_type": "default"})
        if layer_type == FULL:
            if self.rope_scaling and not nested:
                params.update(self.rope_scaling)
                if "type" in self.rope_scaling and "rope_type" not in self.rope_scaling:
                    params["rope_type"] = self.rope_scaling["type"]  # the oldest configs' key
            params.setdefault("rope_theta", self.rope_theta if self.rope_theta is not None else 1_000_000.0)
        else:
            base = self.rope_local_base_freq
            params.setdefault("rope_theta", base if base is not None else 10_000.0)
        return params

    def rope_config(self, layer_type: str) -> LlamaConfig:
        """Llama's rope code reads its parameters from a LlamaConfig: one per layer type."""
        return LlamaConfig(hidden_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
                           head_dim=self.head_dim, max_position_embeddings=self.max_position_embeddings,
                           rope_parameters=self.rope(layer_type))


def _cached(owner: nn.Module, name: str, sources: tuple[torch.Tensor, ...], build) -> torch.Tensor:
    """A tensor derived from `sources` (weights), rebuilt only when one of them changes (another
    storage, or written in place): the decode loop then allocates nothing for it per step. Built
    outside inference mode so that a model used for gradients later can still read it."""
    # Inference tensors (weights made under inference mode) keep no version counter; they
    # cannot be written outside inference mode, so their storage alone identifies them.
    key = tuple((t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype) for t in sources)
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] != key:
        with torch.inference_mode(False), torch.no_grad():
            cached = (key, build())
        owner.__dict__[name] = cached
    return cached[1]


class ScaledWordEmbedding(nn.Embedding):
    """Gemma3TextScaledWordEmbedding: the scale is rounded to the weight's dtype first (sqrt(640)
    is 25.30 in float32, 25.25 in bfloat16), as transformers does."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__(vocab, hidden)
        self.scale = hidden ** 0.5

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        w = self.weight
        scale = _cached(self, "_scale", (w,), lambda: torch.tensor(self.scale, dtype=w.dtype, device=w.device))
        return super().forward(input_ids) * scale


class RMSNorm(nn.Module):
    """Gemma3RMSNorm: (x / rms(x)) * (1 + weight) in float32, cast back, with (1 + weight) kept
    between steps: one torch.rms_norm (F.rms_norm's arithmetic, bit for bit), or one native call
    once the "native_kernels" pass switched it (quantized forms; layers/norms.py)."""

    native_kernels = False

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))
        self.eps = eps

    def scale(self) -> torch.Tensor:
        """1 + weight in float32."""
        return _cached(self, "_scale", (self.weight,), lambda: 1.0 + self.weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norms.rms_norm(x, self.scale(), self.eps, self.native_kernels)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Llama's apply_rotary (x * cos + rotate_half(x) * sin) for x [B, T, heads, D] with cos, sin
    [B, T, 1, D]: rotate_half(x) = [-x2, x1] is roll(x, D/2) = [x2, x1] with the sign moved into
    sin (`sin_signed` = [-sin1, sin2], made once per step): the same products, exactly, in 4 ops
    instead of 7, two in place (not addcmul: its fused multiply-add rounds once, not twice)."""
    return (x * cos).add_(x.roll(x.shape[-1] // 2, dims=-1).mul_(sin_signed))


class MLP(nn.Module):
    """Gemma3MLP: gated GELU (tanh approximation in every released config). After the fuse
    pass (layers/fused_linear.py) gate and up are one projection, `gate_up_proj`."""

    def __init__(self, config: Gemma3TextConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.gate_up_proj: nn.Module | None = None
        self.act = activation(config.hidden_activation)

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj.forward(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj.forward(x), self.up_proj.forward(x)
        return self.down_proj.forward(self.act(gate).mul_(up))  # the activation's output is ours


class Attention(nn.Module):
    """Gemma3Attention: grouped-query attention with q/k RMS norms before RoPE. After the fuse
    pass q, k and v are one projection, `qkv_proj`; either way the query and key heads are
    normed and rotated together, as one [B, T, H + Hkv, D] tensor."""

    native_kernels = False  # its q/k norm and, decoding, the whole block (kv_cache.attend_step_native): see RMSNorm

    def __init__(self, config: Gemma3TextConfig, layer_idx: int):
        super().__init__()
        h, d, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.n_head, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.layer_idx, self.window = layer_idx, config.window(layer_idx)
        self.scale = config.query_pre_attn_scalar ** -0.5
        self.q_proj = nn.Linear(h, self.n_head * d, bias=bias)
        self.k_proj = nn.Linear(h, self.kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, self.kv_heads * d, bias=bias)
        self.qkv_proj: nn.Module | None = None
        self.o_proj = nn.Linear(self.n_head * d, h, bias=bias)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)

    def qk_scale(self) -> torch.Tensor:
        """[H + Hkv, D]: each query head's (1 + q_norm.weight) times the attention's score scale
        (query_pre_attn_scalar^-0.5, folded into the queries: one multiply fewer per layer; a power
        of two in the released configs, 1/16, so exactly the same scores), then each key head's
        (1 + k_norm.weight)."""
        q, k = self.q_norm.weight, self.k_norm.weight
        return _cached(self, "_qk_scale", (q, k), lambda: torch.cat([
            (self.q_norm.scale() * self.scale).expand(self.n_head, -1),
            self.k_norm.scale().expand(self.kv_heads, -1)]))

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        if self.qkv_proj is not None:
            return self.qkv_proj.forward(x)
        return torch.cat([self.q_proj.forward(x), self.k_proj.forward(x), self.v_proj.forward(x)], dim=-1)

    def forward(self, x, cos, sin_signed, view):
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.kv_heads, self.head_dim
        qkv = self.qkv(x)
        if self.native_kernels and T == 1:  # a decoding step: the block after the projection in one call
            step = getattr(view, "attend_step_native", None)
            y = None if step is None else step(self.layer_idx, qkv, self.qk_scale(), self.q_norm.eps, cos, sin_signed,
                                               self.window)
            if y is not None:
                return self.o_proj.forward(y)
        qkv = qkv.view(B, T, H + 2 * Hkv, D)
        qk = qkv[:, :, :H + Hkv]
        # q_norm and k_norm (one eps): normalise every head, then each head's own (1 + weight)
        qk = norms.rms_norm(qk, self.qk_scale(), self.q_norm.eps, self.native_kernels)
        qk = rotate(qk, cos, sin_signed)  # [B, T, H + Hkv, D]
        q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)  # [B, H, T, D], [B, Hkv, T, D]
        v = qkv[:, :, H + Hkv:].transpose(1, 2)
        y = view.attend(self.layer_idx, q, k, v, scale=1.0, window=self.window)  # the scale is in q
        return self.o_proj.forward(y.transpose(1, 2).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    """Gemma3DecoderLayer: x + post_norm(attn(pre_norm(x))), then the same around the MLP.

    The layers call their parts' `forward` directly: nn.Module.__call__ (hooks, which nothing
    here registers) costs ~0.7 us a call, ~200 calls a decoding step."""

    native_kernels = False  # its residual adds with their norms: see RMSNorm

    def __init__(self, config: Gemma3TextConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.layer_type = config.layer_type(layer_idx)
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)

    def forward(self, x, rotary: dict[str, tuple[torch.Tensor, torch.Tensor]], view):
        cos, sin = rotary[self.layer_type]
        if cos.device != x.device:  # under a device map
            cos, sin = cos.to(x.device), sin.to(x.device)
        attn = self.self_attn.forward(self.input_layernorm.forward(x), cos, sin, view)
        # x is ours (hidden() made it): x += post_norm(attn) in place, and the MLP's pre-norm of
        # the sum, in one call (layers/norms.py)
        post, pre = self.post_attention_layernorm, self.pre_feedforward_layernorm
        mlp = self.mlp.forward(norms.add_rms_norm_(x, attn, post.scale(), post.eps, pre.scale(), self.native_kernels))
        post = self.post_feedforward_layernorm
        norms.add_rms_norm_(x, mlp, post.scale(), post.eps, native=self.native_kernels)
        return x


# Rotary rows kept per layer type and dtype (the table doubles from ROTARY_TABLE_MIN as positions
# grow, up to this; later positions are computed as before): 4096 positions of Gemma 3 270M's
# two types, cos and sin, 256 dims in float32 = 16 MiB at most.
ROTARY_TABLE_MIN, ROTARY_TABLE_MAX = 256, 4096


class Rotary(nn.Module):
    """Gemma3RotaryEmbedding: one table per layer type (Llama's, with that type's parameters),
    shared by every layer of that type, as (cos, sin_signed) [B, T, 1, D] for `rotate`.

    The rows come from a table of positions 0..n-1 made once (per dtype, rebuilt when inv_freq
    changes): a decoding step then gathers one row per sequence instead of computing cos and
    sin again: 4 transcendental calls and ~10 more per step (the cos and sin calls took 0.25-0.45
    ms each inside a step on our loaded 2-core machine, 4 us each alone). Each row is
    the same elementwise float32 arithmetic as computing it for that position alone
    (tests/test_gemma3_step.py checks bitwise equality). Dynamic-NTK rope (inv_freq depends on
    the length) and positions past ROTARY_TABLE_MAX are computed per pass."""

    def __init__(self, config: Gemma3TextConfig):
        super().__init__()
        types = sorted({config.layer_type(i) for i in range(config.num_hidden_layers)})
        self.tables = nn.ModuleDict({t: RotaryEmbedding(config.rope_config(t)) for t in types})

    @staticmethod
    def _rows(rope: RotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[*positions.shape, 2D]: cos, then sin_signed ([-sin1, sin2])."""
        cos, sin = rope(positions, dtype)  # [..., D], each half the same frequencies
        half = sin.shape[-1] // 2
        return torch.cat([cos, -sin[..., :half], sin[..., half:]], dim=-1)

    def _table(self, kind: str, rope: RotaryEmbedding, needed: int, dtype: torch.dtype) -> torch.Tensor:
        """[n >= needed, 2D] rows for positions 0..n-1."""
        name = f"_rotary_{kind}_{dtype}"

        def build(size: int) -> torch.Tensor:
            return self._rows(rope, torch.arange(size, device=rope.inv_freq.device), dtype)

        table = _cached(self, name, (rope.inv_freq,), lambda: build(ROTARY_TABLE_MIN))
        if table.shape[0] < needed:
            size = table.shape[0]
            while size < needed:
                size *= 2
            with torch.inference_mode(False), torch.no_grad():
                table = build(min(size, ROTARY_TABLE_MAX))
            self.__dict__[name] = (self.__dict__[name][0], table)
        return table

    def forward(self, positions: torch.Tensor, dtype: torch.dtype,
                needed: int | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """`needed`: 1 + the largest position, when the caller knows it without reading
        `positions` (a GPU tensor would sync)."""
        B, T = positions.shape
        if needed is None:
            needed = int(positions.max()) + 1 if positions.numel() else 0
        out = {}
        for kind, rope in self.tables.items():
            if rope.dynamic or needed > ROTARY_TABLE_MAX:
                rows = self._rows(rope, positions, dtype)
            else:
                rows = F.embedding(positions, self._table(kind, rope, needed, dtype))  # [B, T, 2D]
            out[kind] = rows.view(B, T, 1, -1).chunk(2, dim=-1)
        return out


class _Gemma3TextModel(nn.Module):
    def __init__(self, config: Gemma3TextConfig):
        super().__init__()
        self.embed_tokens = ScaledWordEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = Rotary(config)


class Gemma3ForCausalLM(CausalLM):
    """Gemma3ForCausalLM (and Gemma3ForConditionalGeneration's language model)."""

    # load_in_8bit quantizes activations per row (layers/row_int8.py: batch-invariant, with a
    # residual row): fbgemm's per-batch 7-bit activations moved Gemma's greedy choice on a
    # quarter of the steps, and made a row's tokens depend on its batch. quantization "grouped"
    # keeps a GGUF's own 4-8 bit grids in int4 planes (layers/grid_int4.py).
    # few_rows_dense: a decoding step's 1-3 rows take MKL's GEMV over the dense float32 weights,
    # more rows the packed ones (layers/packed_linear.py: 26.8 against 40.7 ms per step at 1 row)
    post_load = CausalLM.post_load | {"fuse_projections", "row_int8", "grid_int4", "few_rows_dense", "native_kernels"}

    def __init__(self, config: Gemma3TextConfig):
        super().__init__()
        self.config = config
        self.model = _Gemma3TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.num_layers, self.kv_heads = config.num_hidden_layers, config.num_key_value_heads
        self.head_dim, self.max_positions = config.head_dim, config.max_position_embeddings
        # The sliding layers' caches keep only their window (layers/kv_cache.py rings).
        self.layer_windows = [config.window(i) for i in range(config.num_hidden_layers)]

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def fusable_projections(self) -> list[tuple[nn.Module, tuple[str, ...], str]]:
        """The groups the fuse pass makes one linear each (layers/fused_linear.py)."""
        groups = []
        for layer in self.model.layers:
            groups.append((layer.self_attn, ("q_proj", "k_proj", "v_proj"), "qkv_proj"))
            groups.append((layer.mlp, ("gate_proj", "up_proj"), "gate_up_proj"))
        return groups

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """final_logit_softcapping: cap * tanh(logits / cap) (monotonic: the argmax is kept)."""
        cap = self.config.final_logit_softcapping
        if cap is None:
            return logits
        return torch.tanh(logits / cap) * cap

    def hidden(self, input_ids: torch.Tensor, cache_view=None, last_only: bool = False) -> torch.Tensor:
        view, m = self.view_or_full(input_ids, cache_view), self.model
        x = m.embed_tokens.forward(input_ids)
        positions = view.positions  # a CacheView keeps them on the CPU: read without a device sync
        needed = int(positions.max()) + 1 if positions.numel() else 0
        rotary = m.rotary_emb(positions.to(input_ids.device), x.dtype, needed)
        x = run_layers(m.layers, x, lambda layer, h: layer.forward(h, rotary, view), self.layer_devices)
        if last_only:
            x = x[:, -1:]
        if self.layer_devices is None:  # one device: nothing to move
            return m.norm.forward(x)
        return m.norm.forward(x.to(m.norm.weight.device)).to(module_device(self.lm_head))


def text_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The language model's config: gemma3 (multimodal) nests it under text_config, and keeps
    tie_word_embeddings at the top level."""
    if raw.get("model_type") != "gemma3":
        return dict(raw)
    nested = dict(raw.get("text_config") or {})
    nested.setdefault("model_type", "gemma3_text")
    if nested.get("tie_word_embeddings") is None and raw.get("tie_word_embeddings") is not None:
        nested["tie_word_embeddings"] = raw["tie_word_embeddings"]
    return nested


# Checkpoint name prefixes of Gemma3ForConditionalGeneration's language model: transformers >= 5
# saves model.language_model.* (and lm_head.*), earlier versions language_model.model.* and
# language_model.lm_head.*. The vision tower and projector are not ours to load.
_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
             ("language_model.lm_head.", "lm_head."))
_SKIPPED = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector.")


def _rename(name: str) -> str | None:
    if name.startswith(_SKIPPED) or ".rotary_emb." in name:
        return None
    for prefix, ours in _PREFIXES:
        if name.startswith(prefix):
            return ours + name[len(prefix):]
    return name


def parse_config(raw: dict[str, Any]) -> Gemma3TextConfig:
    config = config_from_dict(Gemma3TextConfig, text_config(raw))
    if config.use_bidirectional_attention:
        raise ModelLoadFailed("use_bidirectional_attention (an embedding model's setting) is not supported for "
                              "text generation", reason="UNSUPPORTED_CONFIG")
    if config.num_key_value_heads < 1 or config.num_attention_heads % config.num_key_value_heads:
        raise ModelLoadFailed(f"num_attention_heads {config.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {config.num_key_value_heads}", reason="UNSUPPORTED_CONFIG")
    if config.layer_types is None and not (isinstance(config.sliding_window_pattern, int)
                                           and config.sliding_window_pattern >= 1):
        raise ModelLoadFailed(f"sliding_window_pattern must be a positive integer, got "
                              f"{config.sliding_window_pattern!r}", reason="UNSUPPORTED_CONFIG")
    if config.layer_types is not None and len(config.layer_types) != config.num_hidden_layers:
        raise ModelLoadFailed(f"layer_types has {len(config.layer_types)} entries for {config.num_hidden_layers} "
                              "layers", reason="UNSUPPORTED_CONFIG")
    unknown = {config.layer_type(i) for i in range(config.num_hidden_layers)} - {SLIDING, FULL}
    if unknown:
        raise ModelLoadFailed(f"unknown layer types {sorted(unknown)}; supported: {SLIDING}, {FULL}",
                              reason="UNSUPPORTED_CONFIG")
    if any(config.window(i) is not None for i in range(config.num_hidden_layers)) and not (
            isinstance(config.sliding_window, int) and config.sliding_window > 0):
        raise ModelLoadFailed(f"sliding_window must be a positive integer, got {config.sliding_window!r}",
                              reason="UNSUPPORTED_CONFIG")
    return config


def load_model(files, options, head: str = "causal_lm") -> nn.Module:
    if head not in ("causal_lm", "base"):
        raise ValueError(f"{files.config.get('model_type')} has no {head!r} head here")

    def recipe(checkpoint: Checkpoint) -> ModuleRecipe:
        config = parse_config(checkpoint.config)
        return ModuleRecipe(lambda: Gemma3ForCausalLM(config), rename=_rename,
                            tied={"lm_head.weight": "model.embed_tokens.weight"})

    return load_module(files, options, recipe)
