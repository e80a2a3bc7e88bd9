"""BERT, RoBERTa and XLM-RoBERTa encoders with their task heads.

Ports transformers/models/bert/modeling_bert.py and models/roberta/modeling_roberta.py
(XLM-RoBERTa is RoBERTa with another vocabulary). Parameter names equal checkpoint keys
(`bert.encoder.layer.0.attention.self.query.weight`, `roberta.embeddings...`), so loading is
a short rename table. Every head's forward takes (input_ids, attention_mask, token_type_ids)
and returns plain tensors:

  head                      returns
  base                      (last_hidden_state [B, T, H], pooled [B, H] or None)
  sequence_classification   logits [B, num_labels]
  token_classification      logits [B, T, num_labels]
  question_answering        (start_logits [B, T], end_logits [B, T])
  masked_lm                 logits [B, T, vocab_size]
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

HEADS = ("base", "sequence_classification", "token_classification", "question_answering", "masked_lm")

def labels_of(raw: dict[str, Any]) -> dict[int, str]:
    """config.json id2label with int keys; transformers' default LABEL_i names otherwise."""
    id2label = raw.get("id2label")
    if id2label:
        return {int(k): str(v) for k, v in id2label.items()}
    return {i: f"LABEL_{i}" for i in range(int(raw.get("num_labels", 2)))}


@dataclass(frozen=True)
class BertConfig:
    """config.json of bert / roberta / xlm-roberta (field names as transformers names them)."""

    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"
    problem_type: str | None = None
    id2label: dict[int, str] = field(default_factory=lambda: {0: "LABEL_0", 1: "LABEL_1"})

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "BertConfig":
        config = config_from_dict(cls, raw, id2label=labels_of(raw))
        if config.position_embedding_type != "absolute":
            raise ModelLoadFailed(f"position_embedding_type {config.position_embedding_type!r} is not supported",
                                  reason="BAD_CONFIG")
        return config

    @property
    def is_roberta(self) -> bool:
        return self.model_type in ("roberta", "xlm-roberta")

    @property
    def prefix(self) -> str:
        """The checkpoint prefix of the encoder inside task models."""
        return "roberta" if self.is_roberta else "bert"

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def max_tokens(self) -> int:
        """Longest input the position table allows; RoBERTa's ids start after padding_idx."""
        return self.max_position_embeddings - (self.pad_token_id + 1 if self.is_roberta else 0)


def roberta_position_ids(input_ids: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """Positions count non-pad tokens from padding_idx + 1; pads keep padding_idx.
    Ports modeling_roberta.py RobertaEmbeddings.create_position_ids_from_input_ids."""
    mask = input_ids.ne(padding_idx).int()
    return (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + padding_idx


class BertEmbeddings(nn.Module):
    """Ports modeling_bert.py BertEmbeddings (and RobertaEmbeddings' position ids)."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.roberta = c.is_roberta
        self.padding_idx = c.pad_token_id

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        if self.roberta:
            positions = roberta_position_ids(input_ids, self.padding_idx)
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids) + self.position_embeddings(positions)
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    """Ports modeling_bert.py BertSelfAttention (absolute positions, no cache)."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        split = lambda y: y.view(b, t, self.heads, h // self.heads).transpose(1, 2)  # [B, heads, T, d]
        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                             attn_mask=mask, scale=1.0 / math.sqrt(h // self.heads))
        return out.transpose(1, 2).reshape(b, t, h)


class BertDenseNorm(nn.Module):
    """BertSelfOutput / BertOutput: dense, residual, LayerNorm."""

    def __init__(self, d_in: int, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(c)
        self.output = BertDenseNorm(c.hidden_size, c)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.act_name, self.act = c.hidden_act, activation(c.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_activation(self.dense, x, self.act_name, self.act)


class BertLayer(nn.Module):
    """Ports modeling_bert.py BertLayer (post-norm)."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = BertIntermediate(c)
        self.output = BertDenseNorm(c.intermediate_size, c)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask)
        return x


class BertPooler(nn.Module):
    """Ports modeling_bert.py BertPooler: tanh(dense(first token))."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


def attention_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] 1/0 mask -> additive [B, 1, 1, T] bias (0 keep, dtype min for padding)."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class BertModel(nn.Module):
    """Ports modeling_bert.py BertModel / modeling_roberta.py RobertaModel."""

    def __init__(self, c: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = c
        self.embeddings = BertEmbeddings(c)
        self.encoder = BertEncoder(c)
        self.pooler = BertPooler(c) if add_pooling_layer else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.embeddings(input_ids, token_type_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(x, attention_bias(attention_mask, x.dtype))
        return hidden, (self.pooler(hidden) if self.pooler is not None else None)


class RobertaClassificationHead(nn.Module):
    """Ports modeling_roberta.py RobertaClassificationHead: <s> -> dense -> tanh -> out_proj."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.num_labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(hidden[:, 0])))


class MaskedLMHead(nn.Module):
    """BERT's cls.predictions (BertLMPredictionHead: transform.dense/LayerNorm, decoder + bias)
    and RoBERTa's lm_head (RobertaLMHead: dense, layer_norm, decoder + bias; always erf gelu).
    The decoder weight is tied to the word embeddings unless the checkpoint carries its own."""

    def __init__(self, c: BertConfig):
        super().__init__()
        if c.is_roberta:
            self.dense = nn.Linear(c.hidden_size, c.hidden_size)
            self.layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
            self.act = F.gelu
        else:
            self.transform = nn.Module()
            self.transform.dense = nn.Linear(c.hidden_size, c.hidden_size)
            self.transform.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
            self.act = activation(c.hidden_act)
        self.decoder = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(c.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "transform"):
            x = self.transform.LayerNorm(self.act(self.transform.dense(hidden)))
        else:
            x = self.layer_norm(self.act(self.dense(hidden)))
        return self.decoder(x) + self.bias


class BertForTask(nn.Module):
    """The encoder (named `bert` or `roberta` as in checkpoints) plus one task head."""

    def __init__(self, c: BertConfig, head: str):
        super().__init__()
        self.config = c
        self.head = head
        # BERT's sequence classifier reads the pooler; RoBERTa's and the other heads do not.
        pooled = head == "sequence_classification" and not c.is_roberta
        setattr(self, c.prefix, BertModel(c, add_pooling_layer=pooled))
        if head == "sequence_classification":
            self.classifier = RobertaClassificationHead(c) if c.is_roberta else nn.Linear(c.hidden_size, c.num_labels)
        elif head == "token_classification":
            self.classifier = nn.Linear(c.hidden_size, c.num_labels)
        elif head == "question_answering":
            self.qa_outputs = nn.Linear(c.hidden_size, c.num_labels)  # 2 in QA checkpoints
        elif head == "masked_lm":
            if c.is_roberta:
                self.lm_head = MaskedLMHead(c)
            else:
                self.cls = nn.Module()
                self.cls.predictions = MaskedLMHead(c)

    @property
    def encoder_model(self) -> BertModel:
        return getattr(self, self.config.prefix)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None):
        hidden, pooled = self.encoder_model(input_ids, attention_mask, token_type_ids)
        if self.head == "sequence_classification":
            return self.classifier(hidden) if self.config.is_roberta else self.classifier(pooled)
        if self.head == "token_classification":
            return self.classifier(hidden)
        if self.head == "question_answering":
            logits = self.qa_outputs(hidden)
            return logits[..., 0], logits[..., 1]
        return self.mlm_head(hidden)

    @property
    def mlm_head(self) -> MaskedLMHead:
        return self.lm_head if self.config.is_roberta else self.cls.predictions


# Checkpoint tensors we never use: position-id buffers, next-sentence heads, decoder bias
# copies (the same values as the head's `bias`).
_SKIP_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids", "decoder.bias")
_SKIP_PREFIXES = ("cls.seq_relationship",)


def _renamer(config: BertConfig, head: str, state: dict[str, torch.Tensor]):
    """Checkpoint name -> our name. Base checkpoints (BertModel) have no `bert.` prefix; a base
    model loaded from a task checkpoint drops the task's head tensors."""
    prefix = config.prefix + "."
    has_prefix = any(k.startswith(prefix) for k in state)

    def rename(name: str) -> str | None:
        if name.endswith(_SKIP_SUFFIXES) or name.startswith(_SKIP_PREFIXES):
            return None
        if head == "base":
            if has_prefix:
                return name[len(prefix):] if name.startswith(prefix) else None
            return name
        if not has_prefix and not name.startswith(("classifier.", "qa_outputs.", "cls.", "lm_head.")):
            return prefix + name
        return name

    return rename


def load_model(files: ModelFiles, options, head: str = "base") -> nn.Module:
    """Builds the `head` model of a bert / roberta / xlm-roberta checkpoint (see module doc)."""
    if head not in HEADS:
        raise ModelLoadFailed(f"the bert family has no {head!r} head; heads: {', '.join(HEADS)}", reason="UNSUPPORTED_HEAD")
    return load_module(files, options, lambda checkpoint: _recipe(checkpoint, head))


def _recipe(checkpoint: Checkpoint, head: str) -> ModuleRecipe:
    config = BertConfig.from_dict(checkpoint.config)
    state = checkpoint.state
    if head == "base":
        factory = lambda: BertModel(config, add_pooling_layer=any(k.endswith("pooler.dense.weight") for k in state))
    else:
        factory = lambda: BertForTask(config, head)
    tied = {}
    if head == "masked_lm":
        decoder = ("lm_head." if config.is_roberta else "cls.predictions.") + "decoder.weight"
        tied = {decoder: f"{config.prefix}.embeddings.word_embeddings.weight"}

    def share_tied_decoder(model: nn.Module, state) -> None:
        if tied and not any(k.endswith(decoder) for k in state):
            # Share storage with the input embeddings as transformers' tie_weights does.
            model.mlm_head.decoder.weight = model.encoder_model.embeddings.word_embeddings.weight

    return ModuleRecipe(factory, rename=_renamer(config, head, state), tied=tied, finish=share_tied_decoder)
