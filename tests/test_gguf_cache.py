"""The GGUF derived-text cache (checkpoints/gguf_cache.py) and split-file assembly
(checkpoints/chunked.py): built once, read back after, invalidated by a changed file or
builder, harmless when unwritable; an assembled file whose sha256 differs is refused."""
from __future__ import annotations

import hashlib
import os

import pytest


def test_cached_text_builds_once_and_follows_the_file(tmp_path, monkeypatch):
    from pipeserve.checkpoints.gguf_cache import cached_text

    monkeypatch.setenv("PIPESERVE_CACHE_DIR", str(tmp_path / "cache"))
    source, builder = tmp_path / "model.gguf", tmp_path / "builder.py"
    source.write_bytes(b"one")
    builder.write_text("v1")
    calls = []

    def build():
        calls.append(1)
        return f"built {len(calls)}"

    assert cached_text(source, "tokenizer.json", builder, build) == "built 1"
    assert cached_text(source, "tokenizer.json", builder, build) == "built 1" and len(calls) == 1
    source.write_bytes(b"other")  # a changed file: a new entry
    assert cached_text(source, "tokenizer.json", builder, build) == "built 2"
    builder.write_text("v2")  # a changed builder: a new entry
    assert cached_text(source, "tokenizer.json", builder, build) == "built 3"


def test_cached_text_without_a_writable_folder_still_builds(tmp_path, monkeypatch):
    from pipeserve.checkpoints.gguf_cache import cached_text

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("PIPESERVE_CACHE_DIR", str(blocker / "below-a-file"))
    source = tmp_path / "model.gguf"
    source.write_bytes(b"x")
    assert cached_text(source, "tokenizer.json", source, lambda: "text") == "text"


def test_assembly_checks_the_sha256(tmp_path):
    from pipeserve.checkpoints.chunked import _assemble, _verified
    from pipeserve.errors import ModelLoadFailed

    parts = [tmp_path / "a", tmp_path / "b"]
    parts[0].write_bytes(b"hello ")
    parts[1].write_bytes(b"world")
    target = tmp_path / "out" / "model.gguf"
    with pytest.raises(ModelLoadFailed) as info:
        _assemble(target, parts, "0" * 64)
    assert info.value.reason == "WEIGHTS_MISSING" and not target.exists()
    assert not [p for p in target.parent.iterdir()], "no partial file is left behind"
    _assemble(target, parts, hashlib.sha256(b"hello world").hexdigest())
    assert target.read_bytes() == b"hello world" and _verified(target)
    os.utime(target, ns=(1, 1))  # touched since the check: hashed again on the next use
    assert not _verified(target)
