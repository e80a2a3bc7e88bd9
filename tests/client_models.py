"""Tiny checkpoints for the client tests, built with the task engineers' own builders (so
they are the checkpoints those pipelines are tested with) and loaded through the client."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest


def require_servicer(module: str) -> None:
    """Skips while pipeserve.api.<module> does not exist (the server answers UNIMPLEMENTED)."""
    name = f"pipeserve.api.{module}"
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        pytest.skip(f"{name} has not landed yet, so the server answers UNIMPLEMENTED for this task")


def build(kind: str, directory: Path) -> tuple[Path, str | None]:
    """Saves a tiny checkpoint of `kind`; returns (directory, task to load it as or None)."""
    if kind == "vit":
        from ops_testing import build_tiny_vit
        build_tiny_vit(directory)
        return directory, None
    if kind == "ctc":
        from wav2vec2_checkpoints import build as build_ctc
        build_ctc("base", directory)
        return directory, None
    if kind == "gpt2":
        from generation_checkpoints import build as build_generation
        build_generation("gpt2", directory)
        return directory, None
    if kind == "nli":
        from zero_shot_docqa_checkpoints import build_encoder_nli
        build_encoder_nli("bert", directory)
        return directory, "zero-shot-classification"
    if kind == "layoutlm":
        from zero_shot_docqa_checkpoints import build_layoutlm_qa
        build_layoutlm_qa(directory)
        return directory, None
    from encoder_checkpoints import build_checkpoint
    build_checkpoint("bert", kind, directory)  # base, sequence_classification, token_classification, ...
    return directory, None


class ModelLoader:
    """loader(kind) -> the loaded model's name; each kind is built and loaded once."""

    def __init__(self, address: str, tmp_path_factory) -> None:
        from pipeserve_client import Client

        self.client = Client(address, timeout=300)
        self.tmp = tmp_path_factory
        self.names: dict[str, str] = {}

    def __call__(self, kind: str) -> str:
        if kind not in self.names:
            directory, task = build(kind, self.tmp.mktemp(f"client_{kind}"))
            self.names[kind] = self.client.models.load(str(directory), task=task).name
        return self.names[kind]

    def close(self) -> None:
        for name in self.names.values():
            self.client.models.unload(name)
        self.client.close()


def loader_fixture():
    """The module-scoped `loaded` fixture of the client tests (`loaded = loader_fixture()`):
    loaded(kind) -> model name; builds a tiny checkpoint of that kind once, loads it, and
    unloads everything it loaded when the module's tests are done."""

    @pytest.fixture(scope="module")
    def loaded(grpc_server, tmp_path_factory):
        loader = ModelLoader(grpc_server.address, tmp_path_factory)
        yield loader
        loader.close()

    return loaded
