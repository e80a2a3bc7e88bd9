"""BART (encoder-decoder) for sequence classification, as facebook/bart-large-mnli uses it for
zero-shot classification.

Ports transformers/models/bart/modeling_bart.py. Parameter names equal checkpoint keys
(`model.encoder.layers.0.self_attn.q_proj.weight`, `classification_head.out_proj.bias`, ...), so
loading needs only the tied embeddings: `model.encoder.embed_tokens` and
`model.decoder.embed_tokens` share `model.shared`, and checkpoints usually store only one of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.hub import ModelFiles
from ..checkpoints.family_config import config_from_dict
from ..checkpoints.formats import Checkpoint
from ..checkpoints.loader import ModuleRecipe, load_module
from ..errors import ModelLoadFailed
from ..layers.activations import activation
from ..layers.packed_linear import linear_activation

# BartLearnedPositionalEmbedding offsets every position id by 2 (a fairseq leftover), so the
# table has max_position_embeddings + 2 rows.
POSITION_OFFSET = 2


@dataclass(frozen=True)
class BartConfig:
    """config.json of a BART checkpoint (the fields the forward pass reads)."""

    vocab_size: int = 50265
    d_model: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    decoder_ffn_dim: int = 4096
    activation_function: str = "gelu"
    max_position_embeddings: int = 1024
    scale_embedding: bool = False
    pad_token_id: int = 1
    eos_token_id: int = 2
    decoder_start_token_id: int = 2
    id2label: dict[str, str] = field(default_factory=lambda: {"0": "LABEL_0", "1": "LABEL_1"})

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "BartConfig":
        return config_from_dict(cls, config)

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.d_model) if self.scale_embedding else 1.0


class BartAttention(nn.Module):
    """transformers.models.bart.modeling_bart.BartAttention (self- and cross-attention, no cache:
    classification runs the decoder once over the whole shifted input)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                causal: bool = False) -> torch.Tensor:
        kv = x if kv is None else kv
        b, t, d = x.shape
        # (B, T, D) -> (B, heads, T, D / heads)
        q = self.q_proj(x).view(b, t, self.heads, -1).transpose(1, 2)
        k = self.k_proj(kv).view(b, kv.shape[1], self.heads, -1).transpose(1, 2)
        v = self.v_proj(kv).view(b, kv.shape[1], self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class BartEncoderLayer(nn.Module):
    """modeling_bart.BartEncoderLayer: post-norm self-attention + feed-forward."""

    def __init__(self, cfg: BartConfig):
        super().__init__()
        self.act_name, self.act = cfg.activation_function, activation(cfg.activation_function)
        self.self_attn = BartAttention(cfg.d_model, cfg.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.self_attn_layer_norm(x + self.self_attn(x, mask=mask))
        x = self.final_layer_norm(x + self.fc2(linear_activation(self.fc1, x, self.act_name, self.act)))
        if x.dtype == torch.float16 and not torch.isfinite(x).all():
            # As transformers does: keep float16 activations finite instead of propagating inf.
            limit = torch.finfo(x.dtype).max - 1000
            x = x.clamp(min=-limit, max=limit)
        return x


class BartDecoderLayer(nn.Module):
    """modeling_bart.BartDecoderLayer: causal self-attention, cross-attention, feed-forward."""

    def __init__(self, cfg: BartConfig):
        super().__init__()
        self.act_name, self.act = cfg.activation_function, activation(cfg.activation_function)
        self.self_attn = BartAttention(cfg.d_model, cfg.decoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.encoder_attn = BartAttention(cfg.d_model, cfg.decoder_attention_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.decoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.decoder_ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.self_attn_layer_norm(x + self.self_attn(x, causal=True))
        x = self.encoder_attn_layer_norm(x + self.encoder_attn(x, kv=memory, mask=memory_mask))
        return self.final_layer_norm(x + self.fc2(linear_activation(self.fc1, x, self.act_name, self.act)))


class BartStack(nn.Module):
    """modeling_bart.BartEncoder / BartDecoder: embeddings (scaled tokens + learned positions with
    the offset of 2), layernorm_embedding, then the layers."""

    def __init__(self, cfg: BartConfig, decoder: bool):
        super().__init__()
        self.embed_scale = cfg.embed_scale
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + POSITION_OFFSET, cfg.d_model)
        self.layernorm_embedding = nn.LayerNorm(cfg.d_model)
        layer = BartDecoderLayer if decoder else BartEncoderLayer
        count = cfg.decoder_layers if decoder else cfg.encoder_layers
        self.layers = nn.ModuleList(layer(cfg) for _ in range(count))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device) + POSITION_OFFSET
        x = self.embed_tokens(input_ids) * self.embed_scale + self.embed_positions(positions)
        return self.layernorm_embedding(x)


class BartModel(nn.Module):
    """modeling_bart.BartModel: the decoder reads the input shifted right (BART's denoising
    setup), with only a causal mask: padding sits after the last EOS, so it never reaches it."""

    def __init__(self, cfg: BartConfig):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
        self.encoder = BartStack(cfg, decoder=False)
        self.decoder = BartStack(cfg, decoder=True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # (B, T) -> (B, 1, 1, T) boolean: True where a key may be attended to.
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        x = self.encoder.embed(input_ids)
        for layer in self.encoder.layers:
            x = layer(x, mask)
        # modeling_bart.shift_tokens_right
        shifted = torch.full_like(input_ids, self.cfg.decoder_start_token_id)
        shifted[:, 1:] = input_ids[:, :-1]
        y = self.decoder.embed(shifted)
        for layer in self.decoder.layers:
            y = layer(y, x, mask)
        return y  # (B, T, D) decoder states


class BartClassificationHead(nn.Module):
    """modeling_bart.BartClassificationHead: dense -> tanh -> out_proj."""

    def __init__(self, cfg: BartConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(x)))


class BartForSequenceClassification(nn.Module):
    """modeling_bart.BartForSequenceClassification: classifies the decoder state at the last EOS.

    transformers requires every row to hold the same number of EOS tokens and takes the last;
    taking each row's last EOS is the same for such batches and also serves rows that differ.
    """

    def __init__(self, cfg: BartConfig):
        super().__init__()
        self.cfg = cfg
        self.model = BartModel(cfg)
        self.classification_head = BartClassificationHead(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        states = self.model(input_ids, attention_mask)
        is_eos = input_ids.eq(self.cfg.eos_token_id)
        if not bool(is_eos.any(dim=1).all()):
            raise ValueError("every BART input must contain an <eos> token")
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last_eos = torch.where(is_eos, positions, -1).max(dim=1).values  # (B,)
        pooled = states[torch.arange(states.shape[0], device=states.device), last_eos]
        return self.classification_head(pooled)  # (B, num_labels) logits


_HEADS = {"sequence_classification": BartForSequenceClassification}


def _rename(name: str) -> str | None:
    # The encoder/decoder token tables are tied to model.shared; loading fills them from it.
    if name in ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"):
        return None
    if name == "final_logits_bias":
        return None
    return name


def load_model(files: ModelFiles, options, head: str) -> nn.Module:
    """Builds BART with `head` on options' device and dtype and loads its weights."""
    if head not in _HEADS:
        raise ModelLoadFailed(f"BART offers heads {sorted(_HEADS)}, not {head!r}", reason="UNSUPPORTED_HEAD")
    return load_module(files, options, lambda checkpoint: _recipe(checkpoint, head))


def _shared_table_alias(state) -> None:
    if "model.shared.weight" not in state:
        # Some exports keep only the encoder's copy of the tied table.
        for alias in ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"):
            if alias in state:
                state["model.shared.weight"] = state[alias]
                break


def _share_table(module: nn.Module, state) -> None:
    # Share storage too, so the table is held once.
    module.model.encoder.embed_tokens = module.model.shared
    module.model.decoder.embed_tokens = module.model.shared


def _recipe(checkpoint: Checkpoint, head: str) -> ModuleRecipe:
    cfg = BartConfig.from_dict(checkpoint.config)
    return ModuleRecipe(lambda: _HEADS[head](cfg), rename=_rename, prepare=_shared_table_alias, finish=_share_table,
                        tied={"model.encoder.embed_tokens.weight": "model.shared.weight",
                              "model.decoder.embed_tokens.weight": "model.shared.weight"})
