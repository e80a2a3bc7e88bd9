"""feature-extraction: a text -> token embeddings, or one pooled sentence embedding.

Token embeddings are transformers.pipelines.feature_extraction.FeatureExtractionPipeline's
output: the encoder's last hidden state, special tokens included. Pooled embeddings follow
sentence-transformers' recipe as the checkpoint's own configuration states it:
modules.json lists Transformer -> Pooling (1_Pooling/config.json: pooling_mode_cls_token /
_max_tokens / _mean_tokens / _mean_sqrt_len_tokens, concatenated in that order when several
are on) -> Normalize (L2), and sentence_bert_config.json's max_seq_length bounds the input.
Those are the model's defaults; a request may override pooling (none/mean/cls/max),
normalize and truncate. The recipe's normalisation applies to pooled embeddings only (Normalize
follows Pooling); token embeddings are unit length only when a request sets normalize. Modules other than these three (Dense, ...) are refused at load, since
ignoring them would return wrong embeddings.
Length: sentence-transformers models truncate to max_seq_length by default (as
sentence-transformers does); other models do not (as transformers' pipeline does not), and an
over-long text is INPUT_TOO_LARGE unless the request sets truncate. Empty text: INVALID_INPUT.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from ..checkpoints.hub import ModelFiles
from ..errors import InvalidParameter, ModelLoadFailed
from ..tasks import Task
from .base import LoadOptions
from .encoder_base import EncoderPipeline, check_text, load_text_model
from .options import TaskOptions

POOLINGS = ("none", "mean", "cls", "max")
# sentence-transformers Pooling's concatenation order.
_ST_MODES = (("pooling_mode_cls_token", "cls"), ("pooling_mode_max_tokens", "max"),
             ("pooling_mode_mean_tokens", "mean"), ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"))
_ST_MODULES = {"Transformer", "Pooling", "Normalize"}


@dataclass(frozen=True)
class SentenceTransformerRecipe:
    """What a sentence-transformers checkpoint's configuration asks for."""

    pooling: tuple[str, ...]
    normalize: bool
    max_seq_length: int | None

    @classmethod
    def read(cls, files: ModelFiles) -> "SentenceTransformerRecipe | None":
        modules = files.read_json("modules.json")
        if not modules:
            return None
        pooling: tuple[str, ...] = ()
        normalize = False
        for module in modules:
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            if kind not in _ST_MODULES:
                raise ModelLoadFailed(f"sentence-transformers module {module.get('type')!r} is not supported "
                                      f"(supported: {', '.join(sorted(_ST_MODULES))})", reason="UNSUPPORTED_MODULE")
            if kind == "Pooling":
                config = files.read_json(f"{module.get('path', '')}/config.json".lstrip("/")) or {}
                pooling = tuple(name for key, name in _ST_MODES if config.get(key))
            elif kind == "Normalize":
                normalize = True
        st_config = files.read_json("sentence_bert_config.json") or {}
        max_seq = st_config.get("max_seq_length")
        return cls(pooling=pooling or ("mean",), normalize=normalize, max_seq_length=int(max_seq) if max_seq else None)


@dataclass(frozen=True)
class Features:
    """sentence_embedding [H'] when pooled, else token_embeddings [T, H]; `tokens` = T."""

    sentence_embedding: torch.Tensor | None
    token_embeddings: torch.Tensor | None
    tokens: int

    @property
    def dimensions(self) -> int:
        tensor = self.sentence_embedding if self.sentence_embedding is not None else self.token_embeddings
        return int(tensor.shape[-1])


def pool(hidden: torch.Tensor, modes: tuple[str, ...]) -> torch.Tensor:
    """One row's token embeddings [T, H] (no padding) -> sentence-transformers Pooling output."""
    parts = []
    for mode in modes:
        if mode == "cls":
            parts.append(hidden[0])
        elif mode == "max":
            parts.append(hidden.max(dim=0).values)
        elif mode == "mean":
            parts.append(hidden.sum(dim=0) / max(hidden.shape[0], 1e-9))
        elif mode == "mean_sqrt_len":
            parts.append(hidden.sum(dim=0) / torch.sqrt(torch.tensor(float(hidden.shape[0]))))
    return torch.cat(parts)


@dataclass(frozen=True)
class FeatureExtractionOptions(TaskOptions):
    # None: the checkpoint's sentence-transformers recipe (raw token features without one).
    pooling: str | None = None
    normalize: bool | None = None
    truncate: bool | None = None


class FeatureExtractionPipeline(EncoderPipeline):
    task: ClassVar[Task] = Task.FEATURE_EXTRACTION
    head: ClassVar[str] = "base"
    per_token_outputs: ClassVar[tuple[bool, ...]] = (True, False)
    options_type: ClassVar[type[TaskOptions]] = FeatureExtractionOptions

    def __init__(self, files: ModelFiles, options: LoadOptions, model, tokenizer,
                 recipe: SentenceTransformerRecipe | None = None):
        super().__init__(files, options, model, tokenizer)
        self.recipe = recipe
        if recipe and recipe.max_seq_length:
            self.max_length = min(self.max_length, recipe.max_seq_length)
        self.settle_defaults()

    @classmethod
    def from_files(cls, files: ModelFiles, options: LoadOptions):
        recipe = SentenceTransformerRecipe.read(files)  # bad module lists fail before weights load
        model, tokenizer = load_text_model(files, options, cls.head)
        return cls(files, options, model, tokenizer, recipe)

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        pooling = options.get("pooling")
        if pooling is not None:
            pooling = str(pooling).strip().lower()
            if pooling in ("", "unspecified", "default"):
                pooling = None
            elif pooling not in POOLINGS:
                raise InvalidParameter(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}",
                                       metadata={"field": "pooling"})
        options["pooling"] = pooling
        return options

    def _resolved(self, options: FeatureExtractionOptions) -> tuple[tuple[str, ...], bool, bool]:
        """(pooling modes, normalize, truncate) after the model's recipe defaults."""
        recipe = self.recipe
        pooling = options.pooling
        modes = (() if pooling == "none" else (pooling,)) if pooling else (recipe.pooling if recipe else ())
        normalize = options.normalize
        # The recipe's Normalize module runs after Pooling: it scales sentence embeddings, so
        # token features stay raw unless the request asks (transformers' feature extraction).
        normalize = bool(recipe and recipe.normalize and modes) if normalize is None else bool(normalize)
        truncate = options.truncate
        truncate = recipe is not None if truncate is None else bool(truncate)
        return modes, normalize, truncate

    def extract(self, texts: list[str],
                options: FeatureExtractionOptions | Mapping[str, Any] | None = None) -> list[Features]:
        """Embeddings of each text, in order; batched texts give the same vectors as one at a time."""
        modes, normalize, truncate = self._resolved(self.call_options(options))
        texts = [check_text(t) for t in texts]
        rows = self.tokenizer.encode(texts, max_length=self.max_length, truncation="longest_first" if truncate else None)
        self.check_length(rows, "; set truncate to cut it")
        results = []
        for row, (hidden, _) in zip(rows, self.run_rows(rows)):
            if modes:
                vector = pool(hidden, modes)
                if normalize:
                    vector = torch.nn.functional.normalize(vector, p=2, dim=0)
                results.append(Features(vector, None, len(row)))
            else:
                if normalize:
                    hidden = torch.nn.functional.normalize(hidden, p=2, dim=-1)
                results.append(Features(None, hidden, len(row)))
        return results

    def describe(self) -> dict[str, Any]:
        recipe = self.recipe
        return {**super().describe(), "pooling": "+".join(recipe.pooling) if recipe else "none",
                "normalize": bool(recipe and recipe.normalize)}

    run_batch = extract  # what the dynamic batcher runs (contracts.BatchedPipeline)
