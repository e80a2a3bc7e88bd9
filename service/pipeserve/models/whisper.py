"""Whisper: an audio encoder and a text decoder with a key/value cache.

Ports transformers/models/whisper/modeling_whisper.py (WhisperEncoder, WhisperDecoder,
WhisperAttention, WhisperForConditionalGeneration); parameter names equal the checkpoint keys
of WhisperForConditionalGeneration, so loading is strict with one exception: `proj_out.weight`
is tied to `model.decoder.embed_tokens.weight` and never stored twice. CTranslate2
(faster-whisper) checkpoints are mapped onto the same names by checkpoints/ctranslate2.py.
The decoding loop lives in pipelines/whisper/decoding.py; nothing here does I/O (checkpoints/loader.py reads the files).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.family_config import config_from_dict
from ..checkpoints.formats import Checkpoint
from ..checkpoints.loader import ModuleRecipe, load_module
from ..errors import ModelLoadFailed
from ..layers.activations import activation
from ..layers.fused_linear import fuse_linears
from ..layers.packed_linear import linear_activation


@dataclass(frozen=True)
class WhisperConfig:
    """config.json fields (transformers WhisperConfig names) that shape the network."""

    vocab_size: int = 51865
    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    decoder_layers: int = 4
    decoder_attention_heads: int = 6
    decoder_ffn_dim: int = 1536
    max_source_positions: int = 1500  # 3000 mel frames / conv2 stride 2
    max_target_positions: int = 448
    activation_function: str = "gelu"
    scale_embedding: bool = False
    pad_token_id: int = 50256
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    decoder_start_token_id: int = 50257

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "WhisperConfig":
        eos = config.get("eos_token_id")
        return config_from_dict(cls, config, **({"eos_token_id": eos[0]} if isinstance(eos, list) else {}))


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """modeling_whisper.sinusoids: the encoder's fixed position table."""
    log_timescale_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2))
    scaled_time = torch.arange(length).view(-1, 1) * inv_timescales.view(1, -1)
    return torch.cat([scaled_time.sin(), scaled_time.cos()], dim=1)


def one_row_as_two(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`fn(x)` for a linear map over the rows of x [..., features], computed on two rows when x
    holds one. oneDNN's packed kernels read a row the same way for any number of rows from
    two up (measured to 32 on the build machine), but take another summation order for a
    single row (Whisper tiny's fc2, 1536 inputs: 1.4e-6 apart): so a decoding step's rows
    give the same numbers whether a window decodes alone or batched with others
    (pipelines/whisper/batch_scheduler.py). A second row costs nothing in a memory-bound
    product."""
    if x.shape[:-1].numel() != 1:
        return fn(x)
    return fn(torch.cat([x, x]))[:1]


class KVCache:
    """Preallocated self-attention keys/values of every decoder layer: [batch, heads, max_len, head_dim].
    Cross-attention keys/values are computed once per audio window (`cross`)."""

    def __init__(self, layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                 cross: list[tuple[torch.Tensor, torch.Tensor]], device, dtype):
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.cross = cross
        self.length = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Beam search: row i of the cache becomes old row index[i]."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]
        if self.cross and self.cross[0][0].shape[0] != index.shape[0]:
            self.cross = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross]


class WhisperAttention(nn.Module):
    """modeling_whisper.WhisperAttention (k_proj has no bias)."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, d_model // heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def split(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, H, T, hd]
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def kv(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(self.k_proj(source)), self.split(self.v_proj(source))

    def fuse(self) -> None:
        """Self-attention only: replaces q, k, v by one projection (k has no bias: zeros), so
        they take one matmul instead of three; called once the weights are loaded."""
        if not fuse_linears(self, ("q_proj", "k_proj", "v_proj"), "qkv_proj", missing_bias_as_zeros=True):
            raise ModelLoadFailed("Whisper self-attention: q, k and v projections of different shapes or dtypes",
                                  reason="WEIGHTS_MISMATCH")

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not hasattr(self, "qkv_proj"):
            return self.split(one_row_as_two(self.q_proj, x)), *self.kv(x)
        q, k, v = one_row_as_two(self.qkv_proj, x).chunk(3, dim=-1)
        return self.split(q), self.split(k), self.split(v)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal_offset: int | None = None,
                q: torch.Tensor | None = None) -> torch.Tensor:
        if q is None:
            q = self.split(one_row_as_two(self.q_proj, x))
        mask = None
        if causal_offset is not None and q.shape[2] > 1:
            # query i (absolute position offset+i) sees keys 0..offset+i.
            qpos = torch.arange(q.shape[2], device=x.device)[:, None] + causal_offset
            mask = torch.arange(k.shape[2], device=x.device)[None, :] <= qpos
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return one_row_as_two(self.out_proj, out)

    def attend_encoder(self, x: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor, *,
                       return_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cross-attention of the decoder on cached encoder keys stored transposed
        [B, H, head_dim, frames] and values [B, H, frames, head_dim], both contiguous. Decoding
        reads 1500 keys and values per layer per token; two plain matmuls over contiguous
        memory stream them faster than attention over the head-split views of the projections
        (measured per layer and step, cache cold: 194 us for SDPA on views, 140 us on
        contiguous copies, 117 us here). -> (output, the weights [B, H, T, frames] when asked)."""
        q = self.split(one_row_as_two(self.q_proj, x)) * self.head_dim ** -0.5
        scores = q @ keys_t
        w = scores.softmax(-1) if scores.dtype == torch.float32 else scores.float().softmax(-1).to(scores.dtype)
        out = (w @ values).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return one_row_as_two(self.out_proj, out), (w if return_weights else None)


class WhisperEncoderLayer(nn.Module):
    def __init__(self, c: WhisperConfig):
        super().__init__()
        self.self_attn = WhisperAttention(c.d_model, c.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(c.d_model)
        self.fc1 = nn.Linear(c.d_model, c.encoder_ffn_dim)
        self.fc2 = nn.Linear(c.encoder_ffn_dim, c.d_model)
        self.final_layer_norm = nn.LayerNorm(c.d_model)
        self.act_name, self.act = c.activation_function, activation(c.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.self_attn_layer_norm(x)
        q, k, v = self.self_attn.qkv(h)
        x = x + self.self_attn(h, k, v, q=q)
        return x + self.fc2(linear_activation(self.fc1, self.final_layer_norm(x), self.act_name, self.act))


class WhisperEncoder(nn.Module):
    """modeling_whisper.WhisperEncoder: two convs (the second halves time), fixed positions."""

    def __init__(self, c: WhisperConfig):
        super().__init__()
        self.config = c
        self.conv1 = nn.Conv1d(c.num_mel_bins, c.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(c.d_model, c.d_model, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(c.max_source_positions, c.d_model)
        self.layers = nn.ModuleList(WhisperEncoderLayer(c) for _ in range(c.encoder_layers))
        self.layer_norm = nn.LayerNorm(c.d_model)

    def init_buffers(self) -> None:
        # Checkpoints normally carry this table; it is the fixed sinusoid table when they don't.
        with torch.no_grad():
            self.embed_positions.weight.copy_(sinusoids(*self.embed_positions.weight.shape))

    def forward(self, features: torch.Tensor, after_layer: Callable[[], None] | None = None) -> torch.Tensor:
        """[B, n_mels, 3000] -> [B, 1500, d_model]; `after_layer` is called between layers
        (the server's compute lane lets waiting calls through there)."""
        expected = 2 * self.config.max_source_positions
        if features.shape[-1] != expected:
            raise ValueError(f"Whisper expects {expected} mel frames, got {features.shape[-1]}")
        x = F.gelu(self.conv1(features))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.embed_positions.weight
        for layer in self.layers:
            x = layer(x)
            if after_layer is not None:
                after_layer()
        return self.layer_norm(x)


class WhisperDecoderLayer(nn.Module):
    def __init__(self, c: WhisperConfig):
        super().__init__()
        self.self_attn = WhisperAttention(c.d_model, c.decoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(c.d_model)
        self.encoder_attn = WhisperAttention(c.d_model, c.decoder_attention_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(c.d_model)
        self.fc1 = nn.Linear(c.d_model, c.decoder_ffn_dim)
        self.fc2 = nn.Linear(c.decoder_ffn_dim, c.d_model)
        self.final_layer_norm = nn.LayerNorm(c.d_model)
        self.act_name, self.act = c.activation_function, activation(c.activation_function)

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(linear_activation(self.fc1, h, self.act_name, self.act))

    def forward(self, x: torch.Tensor, self_kv: tuple[torch.Tensor, torch.Tensor], start: int,
                cross_kv: tuple[torch.Tensor, torch.Tensor], *, return_cross_weights: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, d_model] at positions start..start+T-1 -> (x, cross-attention weights
        [B, H, T, frames] when asked). `self_kv` is this layer's preallocated key and value
        buffers [B, H, max_len, head_dim] (KVCache.k[i], KVCache.v[i]): the new keys and values
        are written at start..start+T-1 and attention reads positions 0..start+T-1 causally.
        `cross_kv` is the encoder's keys (transposed) and values (WhisperDecoder.cross_kv)."""
        keys, values = self_kv
        end = start + x.shape[1]
        h = self.self_attn_layer_norm(x)
        q, k, v = self.self_attn.qkv(h)
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        x = x + self.self_attn(h, keys[:, :, :end], values[:, :, :end], causal_offset=start, q=q)
        h, weights = self.encoder_attn.attend_encoder(self.encoder_attn_layer_norm(x), *cross_kv,
                                                      return_weights=return_cross_weights)
        x = x + h
        return x + one_row_as_two(self.mlp, self.final_layer_norm(x)), weights

    def step_groups(self, x: torch.Tensor, groups: list[tuple[int, int, KVCache]], layer: int) -> torch.Tensor:
        """One decoding step of several windows at once: x [R, 1, d_model], rows a..b of each
        group (a, b, cache) at that cache's own position, with its own self-attention
        keys/values (this `layer`'s) and encoder. The projections and the MLP run over all R
        rows together (their weights are read once per step); attention runs per group, over
        that group's own cache and encoder keys, exactly as `forward` does for one window."""
        rows = x.shape[0]
        h = self.self_attn_layer_norm(x)
        q, k, v = self.self_attn.qkv(h)
        outs = []
        for a, b, cache in groups:
            start = cache.length
            keys, values = cache.k[layer], cache.v[layer]
            keys[:, :, start:start + 1] = k[a:b]
            values[:, :, start:start + 1] = v[a:b]
            outs.append(F.scaled_dot_product_attention(q[a:b], keys[:, :, :start + 1], values[:, :, :start + 1]))
        x = x + one_row_as_two(self.self_attn.out_proj, torch.cat(outs).transpose(1, 2).reshape(rows, 1, -1))
        cross = self.encoder_attn
        q = cross.split(one_row_as_two(cross.q_proj, self.encoder_attn_layer_norm(x))) * cross.head_dim ** -0.5
        outs = []
        for a, b, cache in groups:
            keys_t, values = cache.cross[layer]
            scores = q[a:b] @ keys_t
            w = scores.softmax(-1) if scores.dtype == torch.float32 else scores.float().softmax(-1).to(scores.dtype)
            outs.append(w @ values)
        x = x + one_row_as_two(cross.out_proj, torch.cat(outs).transpose(1, 2).reshape(rows, 1, -1))
        return x + one_row_as_two(self.mlp, self.final_layer_norm(x))


class WhisperDecoder(nn.Module):
    """modeling_whisper.WhisperDecoder with our preallocated cache."""

    def __init__(self, c: WhisperConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.d_model)
        self.embed_positions = nn.Embedding(c.max_target_positions, c.d_model)
        self.layers = nn.ModuleList(WhisperDecoderLayer(c) for _ in range(c.decoder_layers))
        self.layer_norm = nn.LayerNorm(c.d_model)
        self.embed_scale = math.sqrt(c.d_model) if c.scale_embedding else 1.0
        # WhisperForConditionalGeneration.proj_out, always tied to embed_tokens (tie_weights).
        self.proj_out = nn.Linear(c.d_model, c.vocab_size, bias=False)
        # Set by the pipeline on CPUs where it pays (layers/verified_head.py): greedy steps' projection.
        self.verified_head: nn.Module | None = None

    def tie_weights(self) -> None:
        self.proj_out.weight = self.embed_tokens.weight

    def cross_kv(self, encoder_out: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer: keys transposed [B, H, head_dim, frames] and values [B, H, frames, head_dim],
        both contiguous (see WhisperAttention.attend_encoder)."""
        out = []
        for layer in self.layers:
            k, v = layer.encoder_attn.kv(encoder_out)
            out.append((k.transpose(-1, -2).contiguous(), v.contiguous()))
        return out

    def new_cache(self, encoder_out: torch.Tensor, max_len: int | None = None) -> KVCache:
        c = self.config
        heads = c.decoder_attention_heads
        return KVCache(c.decoder_layers, encoder_out.shape[0], heads, max_len or c.max_target_positions,
                       c.d_model // heads, self.cross_kv(encoder_out), encoder_out.device, encoder_out.dtype)

    def forward(self, tokens: torch.Tensor, cache: KVCache, logits_at: list[int] | None = None) -> torch.Tensor:
        """tokens [B, T] following the cache's contents -> logits [B, T, vocab]; the cache grows by T.
        `logits_at` (positions in 0..T-1, negatives count from the end) projects only those
        positions -> [B, len(logits_at), vocab]: the vocabulary projection is the largest matmul,
        and a long prompt needs logits at two positions only."""
        return self.proj_out(self.hidden(tokens, cache, logits_at))

    def hidden(self, tokens: torch.Tensor, cache: KVCache, logits_at: list[int] | None = None) -> torch.Tensor:
        """`forward` up to the vocabulary projection: the final layer norm's output [B, T, d_model]."""
        steps = tokens.shape[1]
        x = self._layers(tokens, cache)[0]
        if logits_at is not None:
            x = x[:, [p % steps for p in logits_at]]
        return self.layer_norm(x)

    def hidden_step(self, tokens: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """One decoding step of several windows decoding together ("ragged": each its own
        cache, position and encoder output): tokens [R] are the next input of every row, rows
        in the order of `caches` (cache i owns its batch-size rows) -> the final layer norm's
        output [R, d_model]; every cache grows by one. For one cache this equals
        `hidden(tokens[:, None], cache)[:, -1]`."""
        groups, a = [], 0
        for cache in caches:
            b = a + cache.k[0].shape[0]
            if cache.length + 1 > cache.k[0].shape[2]:
                raise ValueError(f"decoder length {cache.length + 1} exceeds {cache.k[0].shape[2]} positions")
            groups.append((a, b, cache))
            a = b
        if a != tokens.shape[0]:
            raise ValueError(f"{tokens.shape[0]} tokens for {a} cache rows")
        positions = torch.cat([torch.full((b - a,), cache.length, dtype=torch.long) for a, b, cache in groups])
        x = self.embed_tokens(tokens[:, None]) * self.embed_scale + self.embed_positions.weight[positions.to(tokens.device)][:, None]
        for i, layer in enumerate(self.layers):
            x = layer.step_groups(x, groups, i)
        for cache in caches:
            cache.length += 1
        return self.layer_norm(x)[:, -1]

    def cross_attentions(self, tokens: torch.Tensor, encoder_out: torch.Tensor
                         ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Full pass over `tokens` from position 0 returning each layer's cross-attention weights
        [B, H, T, frames], for word-level alignment, and the logits [B, T, vocab] of the same
        pass (for the word probabilities openai-whisper's timing pass reports alongside)."""
        x, weights = self._layers(tokens, self.new_cache(encoder_out, tokens.shape[1]), return_cross_weights=True)
        return weights, self.proj_out(self.layer_norm(x))

    def _layers(self, tokens: torch.Tensor, cache: KVCache, *, return_cross_weights: bool = False
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """tokens [B, T] following the cache's contents through every layer -> (the last layer's
        output [B, T, d_model], per layer the cross-attention weights when asked); the cache grows by T."""
        start, steps = cache.length, tokens.shape[1]
        if start + steps > cache.k[0].shape[2]:
            raise ValueError(f"decoder length {start + steps} exceeds {cache.k[0].shape[2]} positions")
        x = self.embed_tokens(tokens) * self.embed_scale + self.embed_positions.weight[start:start + steps]
        weights = []
        for layer, keys, values, cross in zip(self.layers, cache.k, cache.v, cache.cross):
            x, w = layer(x, (keys, values), start, cross, return_cross_weights=return_cross_weights)
            if w is not None:
                weights.append(w)
        cache.length = start + steps
        return x, weights


class WhisperModel(nn.Module):
    def __init__(self, c: WhisperConfig):
        super().__init__()
        self.encoder = WhisperEncoder(c)
        self.decoder = WhisperDecoder(c)


class WhisperForConditionalGeneration(nn.Module):
    """modeling_whisper.WhisperForConditionalGeneration; `proj_out` is the tied embedding."""

    # layers/passes.py: the tied head keeps the embedding's one float32 weight (column-major)
    # instead of a packed copy, and greedy steps read it too ("exact_head"): the verified head's
    # bfloat16 screening copy (39 MiB for tiny.en) did not pay for itself in a whole
    # transcription (CPU time per 5 s clip 0.95-0.98x without it; bench/asr/bench_memory_tradeoffs.py).
    post_load = frozenset({"share_tied_head", "exact_head"})

    def __init__(self, c: WhisperConfig):
        super().__init__()
        self.config = c
        self.model = WhisperModel(c)

    @property
    def encoder(self) -> WhisperEncoder:
        return self.model.encoder

    @property
    def decoder(self) -> WhisperDecoder:
        return self.model.decoder

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, T, vocab] (for parity tests)."""
        encoder_out = self.encoder(features)
        return self.decoder(tokens, self.decoder.new_cache(encoder_out, tokens.shape[1]))


def _rename(name: str) -> str | None:
    if name == "proj_out.weight":
        return None  # tied to model.decoder.embed_tokens.weight
    if name.startswith(("encoder.", "decoder.")):  # a bare WhisperModel checkpoint
        return "model." + name
    return name


def _fuse_self_attention(model: WhisperForConditionalGeneration, state) -> None:
    for layer in [*model.encoder.layers, *model.decoder.layers]:
        layer.self_attn.fuse()


def load_model(files, options, head: str = "conditional_generation") -> WhisperForConditionalGeneration:
    """Whisper from a transformers checkpoint (config.json + safetensors) or a CTranslate2
    (faster-whisper) directory (model.bin, whose sizes checkpoints/formats.py reads from the
    tensors)."""
    if head not in ("conditional_generation", "base"):
        raise ModelLoadFailed(f"Whisper has no {head!r} head", reason="UNSUPPORTED_HEAD")
    return load_module(files, options, _recipe)


def _recipe(checkpoint: Checkpoint) -> ModuleRecipe:
    config = WhisperConfig.from_dict(checkpoint.config)
    return ModuleRecipe(lambda: WhisperForConditionalGeneration(config), rename=_rename,
                        ignore_missing=["model.encoder.embed_positions.weight"],
                        tied={"model.decoder.proj_out.weight": "model.decoder.embed_tokens.weight"},
                        finish=_fuse_self_attention, half_storage=True)
