"""DistilBERT with the same heads and forward contract as models/bert.py.

Ports transformers/models/distilbert/modeling_distilbert.py. Parameter names equal checkpoint
keys (`distilbert.transformer.layer.0.attention.q_lin.weight`). Sinusoidal position tables
(sinusoidal_pos_embds) are stored in checkpoints as ordinary weights, so nothing is computed.
Forward takes (input_ids, attention_mask, token_type_ids=ignored) and returns what
models/bert.py documents for each head.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..checkpoints.hub import ModelFiles
from ..checkpoints.family_config import config_from_dict
from ..checkpoints.formats import Checkpoint
from ..checkpoints.loader import ModuleRecipe, load_module
from ..errors import ModelLoadFailed
from ..layers.activations import activation
from ..layers.packed_linear import linear_activation
from .bert import HEADS, attention_bias, labels_of

# DistilBertLayerNorm eps: modeling_distilbert.py hard-codes 1e-12.
LAYER_NORM_EPS = 1e-12


@dataclass(frozen=True)
class DistilBertConfig:
    """config.json of distilbert (transformers' field names)."""

    model_type: str = "distilbert"
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    n_layers: int = 6
    n_heads: int = 12
    dim: int = 768
    hidden_dim: int = 3072
    activation: str = "gelu"
    pad_token_id: int = 0
    problem_type: str | None = None
    id2label: dict[int, str] = field(default_factory=lambda: {0: "LABEL_0", 1: "LABEL_1"})

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "DistilBertConfig":
        return config_from_dict(cls, raw, id2label=labels_of(raw))

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def max_tokens(self) -> int:
        return self.max_position_embeddings


class Embeddings(nn.Module):
    """Ports modeling_distilbert.py Embeddings: word + position, LayerNorm (no token types)."""

    def __init__(self, c: DistilBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.dim)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.dim)
        self.LayerNorm = nn.LayerNorm(c.dim, eps=LAYER_NORM_EPS)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions))


class MultiHeadSelfAttention(nn.Module):
    """Ports modeling_distilbert.py DistilBertSelfAttention (q_lin/k_lin/v_lin/out_lin)."""

    def __init__(self, c: DistilBertConfig):
        super().__init__()
        self.heads = c.n_heads
        self.q_lin = nn.Linear(c.dim, c.dim)
        self.k_lin = nn.Linear(c.dim, c.dim)
        self.v_lin = nn.Linear(c.dim, c.dim)
        self.out_lin = nn.Linear(c.dim, c.dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # [B, heads, T, d]
        out = nn.functional.scaled_dot_product_attention(
            split(self.q_lin(x)), split(self.k_lin(x)), split(self.v_lin(x)), attn_mask=mask,
            scale=1.0 / math.sqrt(d // self.heads))
        return self.out_lin(out.transpose(1, 2).reshape(b, t, d))


class FFN(nn.Module):
    def __init__(self, c: DistilBertConfig):
        super().__init__()
        self.lin1 = nn.Linear(c.dim, c.hidden_dim)
        self.lin2 = nn.Linear(c.hidden_dim, c.dim)
        self.act_name, self.act = c.activation, activation(c.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(linear_activation(self.lin1, x, self.act_name, self.act))


class TransformerBlock(nn.Module):
    """Ports modeling_distilbert.py TransformerBlock (post-norm)."""

    def __init__(self, c: DistilBertConfig):
        super().__init__()
        self.attention = MultiHeadSelfAttention(c)
        self.sa_layer_norm = nn.LayerNorm(c.dim, eps=LAYER_NORM_EPS)
        self.ffn = FFN(c)
        self.output_layer_norm = nn.LayerNorm(c.dim, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.sa_layer_norm(self.attention(x, mask) + x)
        return self.output_layer_norm(self.ffn(x) + x)


class Transformer(nn.Module):
    def __init__(self, c: DistilBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(TransformerBlock(c) for _ in range(c.n_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask)
        return x


class DistilBertModel(nn.Module):
    """Ports modeling_distilbert.py DistilBertModel. Returns (last_hidden_state, None): no pooler."""

    def __init__(self, c: DistilBertConfig):
        super().__init__()
        self.config = c
        self.embeddings = Embeddings(c)
        self.transformer = Transformer(c)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        x = self.embeddings(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.transformer(x, attention_bias(attention_mask, x.dtype)), None


class DistilBertForTask(nn.Module):
    """`distilbert` plus one head, named as DistilBertFor* name their tensors."""

    def __init__(self, c: DistilBertConfig, head: str):
        super().__init__()
        self.config = c
        self.head = head
        self.distilbert = DistilBertModel(c)
        if head == "sequence_classification":
            self.pre_classifier = nn.Linear(c.dim, c.dim)
            self.classifier = nn.Linear(c.dim, c.num_labels)
        elif head == "token_classification":
            self.classifier = nn.Linear(c.dim, c.num_labels)
        elif head == "question_answering":
            self.qa_outputs = nn.Linear(c.dim, c.num_labels)  # 2 in QA checkpoints
        elif head == "masked_lm":
            self.vocab_transform = nn.Linear(c.dim, c.dim)
            self.vocab_layer_norm = nn.LayerNorm(c.dim, eps=LAYER_NORM_EPS)
            self.vocab_projector = nn.Linear(c.dim, c.vocab_size)
            self.act = activation(c.activation)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None):
        hidden, _ = self.distilbert(input_ids, attention_mask)
        if self.head == "sequence_classification":
            # DistilBertForSequenceClassification: first token -> pre_classifier -> ReLU -> classifier.
            return self.classifier(torch.relu(self.pre_classifier(hidden[:, 0])))
        if self.head == "token_classification":
            return self.classifier(hidden)
        if self.head == "question_answering":
            logits = self.qa_outputs(hidden)
            return logits[..., 0], logits[..., 1]
        # DistilBertForMaskedLM: vocab_transform -> activation -> vocab_layer_norm -> vocab_projector.
        return self.vocab_projector(self.vocab_layer_norm(self.act(self.vocab_transform(hidden))))


_SKIP_SUFFIXES = ("embeddings.position_ids",)


def load_model(files: ModelFiles, options, head: str = "base") -> nn.Module:
    """Builds the `head` model of a distilbert checkpoint (heads and outputs as in models/bert.py)."""
    if head not in HEADS:
        raise ModelLoadFailed(f"distilbert has no {head!r} head; heads: {', '.join(HEADS)}", reason="UNSUPPORTED_HEAD")
    return load_module(files, options, lambda checkpoint: _recipe(checkpoint, head))


def _recipe(checkpoint: Checkpoint, head: str) -> ModuleRecipe:
    config = DistilBertConfig.from_dict(checkpoint.config)
    state = checkpoint.state
    has_prefix = any(k.startswith("distilbert.") for k in state)
    heads = ("pre_classifier.", "classifier.", "qa_outputs.", "vocab_")

    def rename(name: str) -> str | None:
        if name.endswith(_SKIP_SUFFIXES):
            return None
        if head == "base":
            if has_prefix:
                return name.removeprefix("distilbert.") if name.startswith("distilbert.") else None
            return name
        return name if has_prefix or name.startswith(heads) else "distilbert." + name

    factory = (lambda: DistilBertModel(config)) if head == "base" else (lambda: DistilBertForTask(config, head))
    tied = {"vocab_projector.weight": "distilbert.embeddings.word_embeddings.weight"} if head == "masked_lm" else {}

    def share_tied_projector(model: nn.Module, state) -> None:
        if tied and "vocab_projector.weight" not in state:
            model.vocab_projector.weight = model.distilbert.embeddings.word_embeddings.weight

    return ModuleRecipe(factory, rename=rename, tied=tied, finish=share_tied_projector)
