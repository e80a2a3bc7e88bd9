"""The parity harness every family reuses.

A test builds a tiny random checkpoint with transformers, saves it with save_pretrained to a
temp dir (plus tokenizer / processor files), loads it through pipeserve's real loading path,
and compares logits (max abs diff <= PARITY_ATOL in float32) and final pipeline outputs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

PARITY_ATOL = 1e-4


def save_checkpoint(model, directory: Path, *extras: Any) -> Path:
    """save_pretrained the model (safetensors) and any tokenizer/processor beside it."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    for extra in extras:
        extra.save_pretrained(directory)
    return directory


def load_pipeline(directory: Path, task: str | None = None, **options: Any):
    """Loads `directory` exactly as LoadModel does (hub.resolve -> loading.load_pipeline)."""
    from pipeserve.checkpoints.hub import resolve
    from pipeserve.runtime.loading import load_pipeline as _load
    from pipeserve.pipelines.base import LoadOptions

    return _load(resolve(str(directory)), LoadOptions(**options), task)


def assert_close(ours: torch.Tensor, reference: torch.Tensor, atol: float = PARITY_ATOL) -> None:
    ours = ours.detach().float().cpu()
    reference = reference.detach().float().cpu()
    assert ours.shape == reference.shape, f"shape {tuple(ours.shape)} != reference {tuple(reference.shape)}"
    diff = (ours - reference).abs().max().item()
    assert diff <= atol, f"max |ours - reference| = {diff:.3g} > {atol}"
