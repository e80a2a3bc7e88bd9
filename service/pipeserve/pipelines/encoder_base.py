"""What the encoder text pipelines (text/token classification, QA, fill-mask, features) share:
loading a family head plus its tokenizer, input checks, and running padded batches of rows."""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from ..checkpoints.hub import ModelFiles
from ..errors import InputTooLarge, InvalidInput, InvalidParameter
from ..inputs.text import Row, TextTokenizer
from .base import LoadOptions, Pipeline, load_family_model


def check_text(text: Any, field: str = "text") -> str:
    """A non-empty string, else InvalidInput (reason EMPTY_INPUT)."""
    if not isinstance(text, str):
        raise InvalidInput(f"{field} must be a string, got {type(text).__name__}", metadata={"field": field})
    if not text.strip():
        raise InvalidInput(f"{field} is empty", reason="EMPTY_INPUT", metadata={"field": field})
    return text


def check_positive(options: dict[str, Any], name: str) -> None:
    """An optional integer option that must be >= 1 when set."""
    value = options.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidParameter(f"{name} must be an integer, got {value!r}", metadata={"field": name})
    if value <= 0:
        raise InvalidParameter(f"{name} must be at least 1, got {value}", metadata={"field": name})
    options[name] = int(value)


def too_long(tokens: int, limit: int, hint: str) -> InputTooLarge:
    return InputTooLarge(f"the input is {tokens} tokens long; this model accepts at most {limit}{hint}",
                         metadata={"limit": str(limit), "tokens": str(tokens)})


def load_text_model(files: ModelFiles, options: LoadOptions, head: str) -> tuple[torch.nn.Module, TextTokenizer]:
    """The family's `head` module and the checkpoint's tokenizer. The tokenizer is read first,
    so a missing or bad tokenizer fails before any weights load."""
    tokenizer = TextTokenizer.from_files(files)
    model = load_family_model(files, options, head)
    return model, tokenizer


class TextModelPipeline(Pipeline):
    """A pipeline over one family head (`head`) and the checkpoint's text tokenizer: the
    encoder pipelines below, zero-shot classification and document question answering."""

    head: ClassVar[str] = "base"

    def __init__(self, files: ModelFiles, options: LoadOptions, model: torch.nn.Module, tokenizer: TextTokenizer):
        config = files.config
        super().__init__(files, options, family=config.get("model_type", ""),
                         architecture=(config.get("architectures") or [""])[0])
        self.model = model
        self.modules_.append(model)
        self.tokenizer = tokenizer

    @classmethod
    def from_files(cls, files: ModelFiles, options: LoadOptions):
        model, tokenizer = load_text_model(files, options, cls.head)
        return cls(files, options, model, tokenizer)


class EncoderPipeline(TextModelPipeline):
    """Base of the encoder pipelines: `head` names the family head to load."""

    head: ClassVar[str] = "base"
    # Which of the head's outputs are per token ([B, T, ...], cut to each row's length).
    per_token_outputs: ClassVar[tuple[bool, ...]] = (True, False)
    # Largest number of rows one forward pass takes (bounds activation memory of a big call).
    max_batch_size: int = 32

    def __init__(self, files: ModelFiles, options: LoadOptions, model: torch.nn.Module, tokenizer: TextTokenizer):
        super().__init__(files, options, model, tokenizer)
        self.config = model.config
        # The longest input the tokenizer's model_max_length and the position table allow.
        self.max_length = tokenizer.limit(model.config.max_tokens)

    @torch.inference_mode()
    def run_rows(self, rows: Sequence[Row]) -> list[tuple[torch.Tensor | None, ...]]:
        """Runs the model over rows in padded batches of at most max_batch_size; returns each
        row's outputs (a tuple, one entry per model output) on CPU in float32, per-token outputs
        cut to the row's length so padding never reaches post-processing."""
        results: list[tuple[torch.Tensor | None, ...]] = []
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start:start + self.max_batch_size]
            batch = self.tokenizer.pad(chunk, self.device)
            out = self.model(batch.input_ids, batch.attention_mask, batch.token_type_ids)
            out = out if isinstance(out, tuple) else (out,)
            for i, row in enumerate(chunk):
                results.append(tuple(
                    None if o is None else (o[i, :len(row)] if per_token else o[i]).float().cpu()
                    for o, per_token in zip(out, self.per_token_outputs)))
        return results

    def check_length(self, rows: Sequence[Row], hint: str = "") -> None:
        for row in rows:
            if len(row) > self.max_length:
                raise too_long(len(row), self.max_length, hint)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "max_length": self.max_length}

