"""NOT_FOUND for a Hub id says what the server tried and which settings change it, not
huggingface_hub's advice to pass local_files_only=False (a Python argument a gRPC caller
cannot pass)."""
from __future__ import annotations

import pytest

from pipeserve.checkpoints import hub
from pipeserve.errors import ModelNotFound


def test_offline_miss_names_the_cache_and_the_settings(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(ModelNotFound) as info:
        hub.resolve("someone/not-a-cached-model", offline=True)
    message = info.value.message
    assert "local_files_only" not in message
    assert "local directory someone/not-a-cached-model does not exist" in message
    assert f"not in the server's Hugging Face cache {tmp_path / 'hub-cache'}" in message
    assert "hub_offline" in message and "HF_HOME" in message
