"""The checkpoint formats we read, in one place: a directory -> (config, tensors).

* transformers layout: config.json + safetensors (single or sharded), or pickled
  pytorch_model*.bin only when the load allows pickle (weights.load_state_dict);
* CTranslate2 (faster-whisper) layout: model.bin + tokenizer.json, no config.json with a
  model_type; the sizes come from the tensor shapes (ctranslate2.read_whisper);
* GGUF (llama.cpp): one .gguf file holding metadata, tokenizer and tensors; the config comes
  from the metadata (gguf_families.gguf_config, at resolve time), the tensors are dequantized
  to float and renamed to transformers' names (gguf_families.read_gguf_state).

Families never open files: they receive a Checkpoint and say how its tensors map onto their
modules (checkpoints/loader.py).
"""
from __future__ import annotations

import dataclasses
from collections.abc import MutableMapping
from typing import Any, Callable

import torch

from .ctranslate2 import read_whisper
from .gguf import open_gguf
from .gguf_families import read_gguf_state
from .hub import ModelFiles
from .weights import load_state_dict

# A CTranslate2 directory is recognised by its files: it has no config.json with a model_type.
CTRANSLATE2_WHISPER_MARKERS = ("model.bin", "tokenizer.json")


class Checkpoint:
    """What a family builds from: its config fields and its tensors (checkpoint names). The
    tensors are read when first asked for, so a family rejects a bad config before any file
    of weights is opened."""

    def __init__(self, config: dict[str, Any], read_state: Callable[[], MutableMapping[str, torch.Tensor]],
                 format: str):
        self.config = config
        self.format = format  # "transformers", "ctranslate2" or "gguf"
        self._read_state: Callable[[], MutableMapping[str, torch.Tensor]] | None = read_state
        self._state: MutableMapping[str, torch.Tensor] | None = None

    @property
    def state(self) -> MutableMapping[str, torch.Tensor]:
        if self._state is None:
            self._state = self._read_state()
        return self._state

    def release(self) -> None:
        """Drops the tensors (the module holds its own copies once assigned)."""
        self._state, self._read_state = None, None


def is_ctranslate2_whisper(files: ModelFiles) -> bool:
    return not files.config.get("model_type") and all(files.has(m) for m in CTRANSLATE2_WHISPER_MARKERS)


def read_checkpoint(files: ModelFiles, *, device: str | torch.device, dtype: torch.dtype,
                    allow_pickle: bool = False) -> Checkpoint:
    """The checkpoint in `files`, floating tensors in `dtype` on `device` (CTranslate2 tensors
    are CPU tensors in `dtype`, views of the mapped file where the file has that dtype:
    assignment moves them to the device or takes them as they are)."""
    if files.gguf is not None:
        gguf, config = open_gguf(files.gguf), dict(files.config)
        return Checkpoint(config, lambda: read_gguf_state(gguf, config, dtype, device), "gguf")
    if is_ctranslate2_whisper(files):
        sizes, state = read_whisper(files.path / "model.bin", dtype)  # sizes come from the tensors
        return Checkpoint(dataclasses.asdict(sizes), lambda: state, "ctranslate2")
    return Checkpoint(dict(files.config), lambda: load_state_dict(files.path, device=device, dtype=dtype,
                                                                  allow_pickle=allow_pickle), "transformers")
