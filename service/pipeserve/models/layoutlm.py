"""LayoutLM (v1): BERT plus 2-D position embeddings of each token's word box, for document
question answering (impira/layoutlm-document-qa).

Ports transformers/models/layoutlm/modeling_layoutlm.py. Only the embeddings differ from BERT
(LayoutLMEmbeddings); the encoder layers keep BERT's weight names
(`layoutlm.encoder.layer.0.attention.self.query.weight`, ...), so they are BERT's modules from
models/bert.py, under the `layoutlm.` prefix.

  head                  forward(input_ids, bbox, attention_mask, token_type_ids) returns
  base                  last_hidden_state [B, T, H]
  question_answering    (start_logits [B, T], end_logits [B, T])
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoints.hub import ModelFiles
from ..checkpoints.formats import Checkpoint
from ..checkpoints.loader import ModuleRecipe, load_module
from ..errors import ModelLoadFailed
from .bert import BertConfig, BertEncoder, attention_bias

HEADS = ("base", "question_answering")


@dataclass(frozen=True)
class LayoutLMConfig(BertConfig):
    """config.json of a layoutlm checkpoint: BERT's fields plus the 2-D position table size."""

    model_type: str = "layoutlm"
    max_2d_position_embeddings: int = 1024


class LayoutLMEmbeddings(nn.Module):
    """modeling_layoutlm.py LayoutLMEmbeddings: words + 1-D positions + left/upper/right/lower
    coordinates + box height and width + token types, then LayerNorm."""

    def __init__(self, c: LayoutLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.x_position_embeddings = nn.Embedding(c.max_2d_position_embeddings, c.hidden_size)
        self.y_position_embeddings = nn.Embedding(c.max_2d_position_embeddings, c.hidden_size)
        self.h_position_embeddings = nn.Embedding(c.max_2d_position_embeddings, c.hidden_size)
        self.w_position_embeddings = nn.Embedding(c.max_2d_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, bbox: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        # bbox: [B, T, 4] as (x0, y0, x1, y1) in 0..max_2d_position_embeddings-1
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.x_position_embeddings(bbox[:, :, 0])
            + self.y_position_embeddings(bbox[:, :, 1])
            + self.x_position_embeddings(bbox[:, :, 2])
            + self.y_position_embeddings(bbox[:, :, 3])
            + self.h_position_embeddings(bbox[:, :, 3] - bbox[:, :, 1])
            + self.w_position_embeddings(bbox[:, :, 2] - bbox[:, :, 0])
            + self.token_type_embeddings(token_type_ids)
        )
        return self.LayerNorm(x)


class LayoutLMModel(nn.Module):
    """modeling_layoutlm.py LayoutLMModel without the pooler (no document-QA head reads it)."""

    def __init__(self, c: LayoutLMConfig):
        super().__init__()
        self.embeddings = LayoutLMEmbeddings(c)
        self.encoder = BertEncoder(c)

    def forward(self, input_ids: torch.Tensor, bbox: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.embeddings(input_ids, bbox, token_type_ids)
        return self.encoder(x, attention_bias(attention_mask, x.dtype))


class LayoutLMForQuestionAnswering(nn.Module):
    """modeling_layoutlm.py LayoutLMForQuestionAnswering: a linear start/end scorer per token."""

    def __init__(self, c: LayoutLMConfig):
        super().__init__()
        self.config = c
        self.layoutlm = LayoutLMModel(c)
        self.qa_outputs = nn.Linear(c.hidden_size, 2)

    def forward(self, input_ids: torch.Tensor, bbox: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.qa_outputs(self.layoutlm(input_ids, bbox, attention_mask, token_type_ids))
        return logits[..., 0], logits[..., 1]


def _renamer(head: str, state: dict[str, torch.Tensor]):
    has_prefix = any(k.startswith("layoutlm.") for k in state)

    def rename(name: str) -> str | None:
        # Unused: the pooler, position-id buffers, heads of other tasks.
        if ".pooler." in name or name.startswith("pooler.") or name.endswith("position_ids"):
            return None
        if name.startswith(("cls.", "classifier.")):
            return None
        if head == "base":
            if has_prefix:
                return name.removeprefix("layoutlm.") if name.startswith("layoutlm.") else None
            return name
        if not has_prefix and not name.startswith("qa_outputs."):
            return "layoutlm." + name
        return name

    return rename


def load_model(files: ModelFiles, options, head: str = "question_answering") -> nn.Module:
    """Builds LayoutLM with `head` on options' device and dtype and loads its weights."""
    if head not in HEADS:
        raise ModelLoadFailed(f"layoutlm has no {head!r} head; heads: {', '.join(HEADS)}", reason="UNSUPPORTED_HEAD")
    return load_module(files, options, lambda checkpoint: _recipe(checkpoint, head))


def _recipe(checkpoint: Checkpoint, head: str) -> ModuleRecipe:
    config = LayoutLMConfig.from_dict(checkpoint.config)
    if head == "question_answering" and config.num_labels != 2:
        raise ModelLoadFailed(f"a question-answering head needs 2 labels (start, end), this config has "
                              f"{config.num_labels}", reason="BAD_CONFIG")
    factory = (lambda: LayoutLMModel(config)) if head == "base" else (lambda: LayoutLMForQuestionAnswering(config))
    return ModuleRecipe(factory, rename=_renamer(head, checkpoint.state))
