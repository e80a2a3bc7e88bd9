"""Tokenization shared by the text pipelines, on the `tokenizers` library (tokenizer.json),
behaving as transformers' fast tokenizers do.

API (small on purpose):

    tok = TextTokenizer.from_files(files)          # tokenizer.json + tokenizer_config.json
    rows = tok.encode(texts, pairs=None, max_length=..., truncation="longest_first",
                      stride=0, overflow=False)    # -> list[Row], one per window
    batch = tok.pad(rows, device)                  # -> Batch (right padding, attention mask)
    model(**batch.model_inputs())                  # input_ids, attention_mask[, token_type_ids]
    tok.decode(ids, skip_special_tokens=True)      # transformers' decode (incl. clean-up)
    tok.convert_tokens_to_string(tokens)

A Row carries ids, type ids, character offsets into its input (Unicode code points), the
special-tokens mask, sequence ids (0 text, 1 pair, None special), word ids and `source`, the
index of the input it came from (several rows per input when `overflow` splits a long text).

Maximum length: `model_max_length` comes from tokenizer_config.json (None when absent, as
transformers treats its VERY_LARGE_INTEGER); `TextTokenizer.limit(model_tokens)` clamps it to
what the model's position table allows.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..checkpoints.hub import ModelFiles
from ..errors import InvalidInput, ModelLoadFailed

# transformers' tokenization_utils_base.VERY_LARGE_INTEGER: "no maximum" in tokenizer configs.
_VERY_LARGE = int(1e20)
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
Truncation = str | None  # "longest_first" | "only_first" | "only_second" | None


@dataclass(frozen=True)
class Row:
    """One encoded window of one input."""

    ids: list[int]
    type_ids: list[int]
    offsets: list[tuple[int, int]]
    special_mask: list[int]
    sequence_ids: list[int | None]
    word_ids: list[int | None]
    source: int

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Batch:
    """Right-padded tensors of several rows."""

    input_ids: torch.Tensor  # [B, T] int64
    attention_mask: torch.Tensor  # [B, T] int64, 1 = token, 0 = padding
    token_type_ids: torch.Tensor | None  # [B, T] int64, None when the model takes none

    def model_inputs(self) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.token_type_ids is not None:
            inputs["token_type_ids"] = self.token_type_ids
        return inputs


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class TextTokenizer:
    """A tokenizer.json with the settings of tokenizer_config.json. Thread-safe: each
    truncation setting gets its own configured copy of the Rust tokenizer, built once."""

    def __init__(self, tokenizer_json: str, config: dict[str, Any], model_config: dict[str, Any] | None = None):
        from tokenizers import Tokenizer

        self._json = tokenizer_json
        self._base = Tokenizer.from_str(tokenizer_json)
        self._base.no_truncation()
        self._base.no_padding()
        self._configured: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        self.config = config
        model_config = model_config or {}
        self.special_tokens: dict[str, str] = {}
        for name in _SPECIAL_NAMES:
            content = _token_content(config.get(name))
            if content is not None and self._base.token_to_id(content) is not None:
                self.special_tokens[name] = content
        max_len = config.get("model_max_length")
        self.model_max_length: int | None = int(max_len) if max_len and int(max_len) < _VERY_LARGE else None
        names = config.get("model_input_names")
        self.uses_token_type_ids = "token_type_ids" in names if names else model_config.get("model_type") == "bert"
        self.truncation_side = config.get("truncation_side", "right")
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self._is_bpe = type(self._base.model).__name__ == "BPE"
        pad = self.special_tokens.get("pad_token")
        self.pad_token_id: int = self._base.token_to_id(pad) if pad else int(model_config.get("pad_token_id") or 0)
        self.all_special_ids = {self._base.token_to_id(t) for t in self.special_tokens.values()}
        self.all_special_ids |= {i for i, t in self._base.get_added_tokens_decoder().items() if t.special}

    @classmethod
    def from_files(cls, files: ModelFiles) -> "TextTokenizer":
        tokenizer_json = files.tokenizer_json()  # tokenizer.json, or built from GGUF metadata
        if tokenizer_json is None:
            raise ModelLoadFailed(f"{files.path} has no tokenizer.json (only fast tokenizers are supported)",
                                  reason="TOKENIZER_MISSING")
        config = files.read_json("tokenizer_config.json") or {}
        special_map = files.read_json("special_tokens_map.json") or {}
        config = {**{k: v for k, v in special_map.items() if k in _SPECIAL_NAMES}, **config}
        try:
            return cls(tokenizer_json, config, files.config)
        except Exception as exc:  # the tokenizers library raises plain Exceptions for bad files
            raise ModelLoadFailed(f"cannot read the tokenizer of {files.path}: {exc}",
                                  reason="TOKENIZER_INVALID") from None

    # --- vocabulary -------------------------------------------------------------------------
    def token_id(self, name: str) -> int | None:
        """Id of a special token by role ("mask_token", "pad_token"...), None when undefined."""
        token = self.special_tokens.get(name)
        return self._base.token_to_id(token) if token is not None else None

    @property
    def mask_token(self) -> str | None:
        return self.special_tokens.get("mask_token")

    @property
    def unk_token_id(self) -> int | None:
        return self.token_id("unk_token")

    def token_to_id(self, token: str) -> int | None:
        return self._base.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._base.id_to_token(int(token_id))

    def vocab(self) -> dict[str, int]:
        return self._base.get_vocab(with_added_tokens=True)

    @property
    def continuing_subword_prefix(self) -> str | None:
        """WordPiece/BPE models that mark word continuations (used to find word boundaries)."""
        return getattr(self._base.model, "continuing_subword_prefix", None)

    def num_special_tokens(self, pair: bool = False) -> int:
        return self._base.num_special_tokens_to_add(pair)

    def limit(self, model_tokens: int) -> int:
        """The longest input this tokenizer and a model with `model_tokens` positions accept."""
        return min(self.model_max_length or model_tokens, model_tokens)

    # --- encoding ---------------------------------------------------------------------------
    def _tokenizer(self, max_length: int | None, truncation: Truncation, stride: int):
        if truncation is None or max_length is None:
            return self._base
        key = (max_length, truncation, stride)
        tok = self._configured.get(key)
        if tok is None:
            from tokenizers import Tokenizer

            with self._lock:
                tok = self._configured.get(key)
                if tok is None:
                    tok = Tokenizer.from_str(self._json)
                    tok.no_padding()
                    try:
                        tok.enable_truncation(max_length, stride=stride, strategy=truncation,
                                              direction=self.truncation_side)
                    except Exception as exc:
                        raise InvalidInput(f"cannot truncate to {max_length} tokens with stride {stride}: {exc}") from None
                    self._configured[key] = tok
        return tok

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None, *, max_length: int | None = None,
               truncation: Truncation = "longest_first", stride: int = 0, overflow: bool = False,
               add_special_tokens: bool = True, pretokenized: bool = False) -> list[Row]:
        """Encodes texts (and pairs) as transformers' tokenizer(..., truncation, max_length,
        stride, return_overflowing_tokens=overflow, is_split_into_words=pretokenized) does;
        with `pretokenized`, each text (and pair) is a list of words. Rows keep the input order."""
        tok = self._tokenizer(max_length, truncation, stride)
        inputs = list(zip(texts, pairs)) if pairs is not None else list(texts)
        try:
            encodings = tok.encode_batch(inputs, is_pretokenized=pretokenized, add_special_tokens=add_special_tokens)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: B036 - the Rust side panics (pyo3 PanicException is a
            # BaseException) when a stride does not fit what truncation leaves of the window.
            raise InvalidInput(f"cannot tokenize the input with max_length={max_length}, stride={stride}: "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        rows = []
        for source, encoding in enumerate(encodings):
            for window in [encoding] + (list(encoding.overflowing) if overflow else []):
                rows.append(Row(ids=list(window.ids), type_ids=list(window.type_ids), offsets=list(window.offsets),
                                special_mask=list(window.special_tokens_mask),
                                sequence_ids=list(window.sequence_ids), word_ids=list(window.word_ids),
                                source=source))
        return rows

    def tokenize_ids(self, text: str) -> list[int]:
        """Ids of `text` without special tokens or truncation."""
        return list(self._base.encode(text, add_special_tokens=False).ids)

    def pad(self, rows: Sequence[Row], device: torch.device | str = "cpu") -> Batch:
        """Right padding with the pad token, as the pipelines' collate functions do."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        types = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row)
            ids[i, :n] = torch.tensor(row.ids, dtype=torch.long)
            mask[i, :n] = 1
            types[i, :n] = torch.tensor(row.type_ids, dtype=torch.long)
        return Batch(ids.to(device), mask.to(device), types.to(device) if self.uses_token_type_ids else None)

    # --- decoding ---------------------------------------------------------------------------
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """transformers' TokenizersBackend._decode: backend decode, then the WordPiece-era
        space clean-up when the config asks for it (never for BPE)."""
        text = self._base.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces and not self._is_bpe:
            text = clean_up_tokenization(text)
        return text

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        decoder = self._base.decoder
        return decoder.decode(list(tokens)) if decoder is not None else " ".join(tokens)


def clean_up_tokenization(text: str) -> str:
    """transformers' PreTrainedTokenizerBase.clean_up_tokenization."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def model_max_tokens(config: dict[str, Any]) -> int:
    """Positions a BERT-like model accepts (RoBERTa-style ids start after padding_idx)."""
    positions = int(config.get("max_position_embeddings", 512))
    if config.get("model_type") in ("roberta", "xlm-roberta", "camembert"):
        positions -= int(config.get("pad_token_id", 1)) + 1
    return positions
