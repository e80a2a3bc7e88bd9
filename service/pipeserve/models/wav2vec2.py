"""Wav2Vec2 and HuBERT: a convolutional feature encoder over the raw 16 kHz waveform, a
transformer encoder with a convolutional positional embedding, and a CTC head.

Ports transformers/models/wav2vec2/modeling_wav2vec2.py (Wav2Vec2ForCTC and its parts) and
transformers/models/hubert/modeling_hubert.py (HubertForCTC, which differs only in an optional
feature-projection layer norm and an optional batch-norm positional embedding). Module names
equal checkpoint keys; `wav2vec2.` or `hubert.` is the base-model prefix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.family_config import config_from_dict
from ..checkpoints.formats import Checkpoint
from ..checkpoints.loader import ModuleRecipe, load_module
from ..errors import ModelLoadFailed
from ..layers.activations import activation
from ..layers.packed_linear import linear_activation


@dataclass(frozen=True)
class Wav2Vec2Config:
    """config.json fields we use (names as in Wav2Vec2Config / HubertConfig)."""

    model_type: str = "wav2vec2"
    vocab_size: int = 32
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    feat_extract_norm: str = "group"  # "group": base models; "layer": large/lv60 models
    feat_extract_activation: str = "gelu"
    conv_dim: tuple[int, ...] = (512, 512, 512, 512, 512, 512, 512)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_bias: bool = False
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False  # pre-norm encoder layers (large/lv60 models)
    feat_proj_layer_norm: bool = True  # HuBERT may drop the projection's layer norm
    conv_pos_batch_norm: bool = False  # HuBERT variant: batch norm instead of weight norm
    add_adapter: bool = False
    adapter_attn_dim: int | None = None
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "Wav2Vec2Config":
        return config_from_dict(cls, config)

    @property
    def inputs_to_logits_ratio(self) -> int:
        """Samples per output frame: the product of conv strides (320 = 20 ms at 16 kHz)."""
        return math.prod(self.conv_stride)

    def output_length(self, input_length: torch.Tensor | int) -> torch.Tensor | int:
        """Frames the feature encoder makes of `input_length` samples
        (Wav2Vec2PreTrainedModel._get_feat_extract_output_lengths)."""
        for kernel, stride in zip(self.conv_kernel, self.conv_stride):
            input_length = (input_length - kernel) // stride + 1
        return input_length


class ConvLayer(nn.Module):
    """One feature-encoder conv: Wav2Vec2NoLayerNormConvLayer / GroupNormConvLayer /
    LayerNormConvLayer (norm = None, "group", "layer")."""

    def __init__(self, config: Wav2Vec2Config, layer_id: int, norm: str | None):
        super().__init__()
        in_dim = config.conv_dim[layer_id - 1] if layer_id > 0 else 1
        out_dim = config.conv_dim[layer_id]
        self.conv = nn.Conv1d(in_dim, out_dim, config.conv_kernel[layer_id], config.conv_stride[layer_id],
                              bias=config.conv_bias)
        self.norm = norm
        if norm == "group":  # one group per channel: normalises each channel over time
            self.layer_norm = nn.GroupNorm(out_dim, out_dim, affine=True)
        elif norm == "layer":
            self.layer_norm = nn.LayerNorm(out_dim, elementwise_affine=True)
        self.act = activation(config.feat_extract_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, T) -> (B, C_out, T')
        x = self.conv(x)
        if self.norm == "group":
            x = self.layer_norm(x)
        elif self.norm == "layer":
            x = self.layer_norm(x.transpose(-2, -1)).transpose(-2, -1)
        return self.act(x)


class FeatureEncoder(nn.Module):
    """Wav2Vec2FeatureEncoder: raw samples (B, N) -> features (B, conv_dim[-1], T)."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        n = len(config.conv_dim)
        if config.feat_extract_norm == "group":
            layers = [ConvLayer(config, 0, "group")] + [ConvLayer(config, i, None) for i in range(1, n)]
        elif config.feat_extract_norm == "layer":
            layers = [ConvLayer(config, i, "layer") for i in range(n)]
        else:
            raise ModelLoadFailed(f"feat_extract_norm {config.feat_extract_norm!r} is not 'group' or 'layer'",
                                  reason="UNSUPPORTED_CONFIG")
        self.conv_layers = nn.ModuleList(layers)

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        x = input_values[:, None]
        for layer in self.conv_layers:
            x = layer(x)
        return x


class FeatureProjection(nn.Module):
    """Wav2Vec2FeatureProjection / HubertFeatureProjection: layer norm (optional for HuBERT) + linear."""

    def __init__(self, config: Wav2Vec2Config, layer_norm: bool = True):
        super().__init__()
        if layer_norm:
            self.layer_norm = nn.LayerNorm(config.conv_dim[-1], eps=config.layer_norm_eps)
        self.projection = nn.Linear(config.conv_dim[-1], config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "layer_norm"):
            x = self.layer_norm(x)
        return self.projection(x)


class WeightNormConv1d(nn.Module):
    """The positional conv under weight norm over dim 2 (nn.utils.weight_norm(conv, dim=2)):
    weight = weight_v * weight_g / ||weight_v|| with the norm over every dim but 2. Checkpoints
    name g/v either weight_g/weight_v or parametrizations.weight.original0/original1."""

    def __init__(self, channels: int, kernel: int, groups: int):
        super().__init__()
        self.weight_g = nn.Parameter(torch.empty(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel))
        self.bias = nn.Parameter(torch.empty(channels))
        self.padding, self.groups = kernel // 2, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch._weight_norm(self.weight_v, self.weight_g, 2)
        return F.conv1d(x, weight, self.bias, padding=self.padding, groups=self.groups)


class PositionalConvEmbedding(nn.Module):
    """Wav2Vec2PositionalConvEmbedding (+ HubertPositionalConvEmbedding's batch-norm variant)."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        k, groups, h = config.num_conv_pos_embeddings, config.num_conv_pos_embedding_groups, config.hidden_size
        if config.conv_pos_batch_norm:
            self.batch_norm = nn.BatchNorm1d(h)
            self.conv = nn.Conv1d(h, h, k, padding=k // 2, groups=groups)
        else:
            self.conv = WeightNormConv1d(h, k, groups)
        # Wav2Vec2SamePadLayer: an even kernel makes one extra frame, dropped at the end.
        self.num_pad_remove = 1 if k % 2 == 0 else 0
        self.act = activation(config.feat_extract_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H)
        x = x.transpose(1, 2)
        if hasattr(self, "batch_norm"):
            x = self.batch_norm(x)
        x = self.conv(x)
        if self.num_pad_remove:
            x = x[:, :, : -self.num_pad_remove]
        return self.act(x).transpose(1, 2)


class Attention(nn.Module):
    """Wav2Vec2Attention (encoder self-attention only)."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = h // self.num_heads
        self.q_proj, self.k_proj = nn.Linear(h, h), nn.Linear(h, h)
        self.v_proj, self.out_proj = nn.Linear(h, h), nn.Linear(h, h)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale = head_dim ** -0.5
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    """Wav2Vec2FeedForward."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        self.intermediate_dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.output_dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act_name, self.act = config.hidden_act, activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_dense(linear_activation(self.intermediate_dense, x, self.act_name, self.act))


class EncoderLayer(nn.Module):
    """Wav2Vec2EncoderLayer (post-norm) or, with stable=True,
    Wav2Vec2EncoderLayerStableLayerNorm (pre-norm)."""

    def __init__(self, config: Wav2Vec2Config, stable: bool):
        super().__init__()
        self.stable = stable
        self.attention = Attention(config)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = FeedForward(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.stable:
            x = x + self.attention(self.layer_norm(x), mask)
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x + self.attention(x, mask))
        return self.final_layer_norm(x + self.feed_forward(x))


class Encoder(nn.Module):
    """Wav2Vec2Encoder / Wav2Vec2EncoderStableLayerNorm: the layer norm comes before the layers
    (post-norm) or after them (stable layer norm)."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        self.stable = config.do_stable_layer_norm
        self.pos_conv_embed = PositionalConvEmbedding(config)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(config, self.stable) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
        attn_mask = None
        if frame_mask is not None:
            x = x * frame_mask[..., None].to(x.dtype)  # padded frames are zero, as in the reference
            attn_mask = frame_mask[:, None, None, :]  # (B, 1, 1, T) keys to attend
        x = x + self.pos_conv_embed(x)
        if not self.stable:
            x = self.layer_norm(x)
        for layer in self.layers:
            x = layer(x, attn_mask)
        return self.layer_norm(x) if self.stable else x


class Wav2Vec2Model(nn.Module):
    """Wav2Vec2Model / HubertModel: waveform (B, N) -> hidden states (B, T, H)."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        self.config = config
        self.feature_extractor = FeatureEncoder(config)
        hubert = config.model_type == "hubert"
        self.feature_projection = FeatureProjection(config, layer_norm=config.feat_proj_layer_norm or not hubert)
        self.encoder = Encoder(config)

    def frame_mask(self, attention_mask: torch.Tensor, frames: int) -> torch.Tensor:
        """Sample mask (B, N) -> frame mask (B, T): frames before each row's output length
        (Wav2Vec2PreTrainedModel._get_feature_vector_attention_mask)."""
        lengths = self.config.output_length(attention_mask.sum(-1).long())
        return torch.arange(frames, device=attention_mask.device)[None, :] < lengths[:, None]

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        features = self.feature_extractor(input_values).transpose(1, 2)  # (B, T, C)
        mask = None if attention_mask is None else self.frame_mask(attention_mask, features.shape[1])
        return self.encoder(self.feature_projection(features), mask)


class Wav2Vec2ForCTC(nn.Module):
    """Wav2Vec2ForCTC / HubertForCTC: hidden states -> per-frame vocabulary logits (B, T, V)."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        self.config = config
        self.prefix = config.model_type  # "wav2vec2" or "hubert": the checkpoint's base-model prefix
        setattr(self, self.prefix, Wav2Vec2Model(config))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)

    @property
    def base(self) -> Wav2Vec2Model:
        return getattr(self, self.prefix)

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.base(input_values, attention_mask))


# Checkpoint names that differ from ours: torch's parametrized weight norm.
_RENAMES = {
    "parametrizations.weight.original0": "weight_g",
    "parametrizations.weight.original1": "weight_v",
}
# Training-only tensors (SpecAugment mask embedding, pretraining heads) that inference skips.
_SKIP = ("masked_spec_embed", "quantizer.", "project_hid.", "project_q.", "num_batches_tracked")


def _rename(prefix: str, keep_prefix: bool):
    def rename(name: str) -> str | None:
        if any(s in name for s in _SKIP):
            return None
        for old, new in _RENAMES.items():
            name = name.replace(old, new)
        if not keep_prefix:
            if not name.startswith(prefix + "."):
                return None  # a head (lm_head) the base model does not have
            name = name[len(prefix) + 1:]
        return name
    return rename


def load_model(files, options, head: str = "ctc") -> nn.Module:
    """Builds Wav2Vec2ForCTC (head "ctc") or Wav2Vec2Model (head "base") from a checkpoint."""
    return load_module(files, options, lambda checkpoint: _recipe(checkpoint, head, files.path))


def _recipe(checkpoint: Checkpoint, head: str, path) -> ModuleRecipe:
    config = Wav2Vec2Config.from_dict(checkpoint.config)
    if config.model_type not in ("wav2vec2", "hubert"):
        raise ModelLoadFailed(f"model_type {config.model_type!r} is not wav2vec2 or hubert", reason="UNSUPPORTED_CONFIG")
    if config.add_adapter or config.adapter_attn_dim is not None:
        raise ModelLoadFailed("wav2vec2 adapters (add_adapter, adapter_attn_dim / MMS) are not supported",
                              reason="UNSUPPORTED_CONFIG")
    if head not in ("ctc", "base"):
        raise ModelLoadFailed(f"wav2vec2 has no {head!r} head; use 'ctc' or 'base'", reason="UNSUPPORTED_HEAD")
    factory = (lambda: Wav2Vec2ForCTC(config)) if head == "ctc" else (lambda: Wav2Vec2Model(config))
    state = checkpoint.state
    prefix = config.model_type
    # A base checkpoint (Wav2Vec2Model.save_pretrained) has no prefix; a CTC one has.
    prefixed = any(k.startswith(prefix + ".") for k in state)
    if head == "ctc" and not prefixed:
        raise ModelLoadFailed(f"{path} holds a base {prefix} model without a CTC head (lm_head)",
                              reason="WEIGHTS_MISMATCH")
    return ModuleRecipe(factory, rename=_rename(prefix, keep_prefix=(head == "ctc") or not prefixed),
                        ignore_missing=_batch_norm_counters)


def _batch_norm_counters(model: nn.Module) -> list[str]:
    """BatchNorm's step counters: training state that checkpoints may omit."""
    return [n for n in model.state_dict() if n.endswith("num_batches_tracked")]
