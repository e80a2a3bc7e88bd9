"""Wav2Vec2 / HuBERT CTC model parity: our logits vs transformers' on tiny random checkpoints."""
from __future__ import annotations

import json

import pytest
import torch

import wav2vec2_checkpoints as ck
from harness import assert_close
from pipeserve.errors import ModelLoadFailed
from pipeserve.checkpoints.hub import resolve
from pipeserve.models.wav2vec2 import Wav2Vec2ForCTC, Wav2Vec2Model, load_model
from pipeserve.pipelines.base import LoadOptions

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=list(ck.VARIANTS))
def checkpoint(request, tmp_path_factory):
    directory, reference = ck.build(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, directory, reference


def test_logits_match_transformers(checkpoint):
    variant, directory, reference = checkpoint
    ours = load_model(resolve(str(directory)), LoadOptions(), head="ctc")
    assert isinstance(ours, Wav2Vec2ForCTC) and not ours.training
    x = torch.from_numpy(ck.audio(1.3, seed=3))[None]
    with torch.no_grad():
        assert_close(ours(x), reference(x).logits)


def test_batched_with_attention_mask_matches_transformers(checkpoint):
    """Padded batch + attention mask (how layer-norm models are meant to be batched); for
    group-norm models the reference computes the same (padding changes its group norm too)."""
    variant, directory, reference = checkpoint
    ours = load_model(resolve(str(directory)), LoadOptions(), head="ctc")
    a, b = torch.from_numpy(ck.audio(1.0, seed=4)), torch.from_numpy(ck.audio(0.6, seed=5))
    batch = torch.zeros(2, a.shape[0])
    batch[0], batch[1, : b.shape[0]] = a, b
    mask = torch.zeros(2, a.shape[0], dtype=torch.long)
    mask[0], mask[1, : b.shape[0]] = 1, 1
    with torch.no_grad():
        ours_logits = ours(batch, mask)
        ref_logits = reference(batch, attention_mask=mask).logits
    valid = int(ours.config.output_length(b.shape[0]))
    assert_close(ours_logits[0], ref_logits[0])
    assert_close(ours_logits[1, :valid], ref_logits[1, :valid])


def test_legacy_weight_norm_names(tmp_path):
    """Older checkpoints store the positional conv as weight_g / weight_v."""
    directory, reference = ck.build("base", tmp_path, legacy_weight_norm=True)
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        assert any(k.endswith("pos_conv_embed.conv.weight_g") for k in f.keys())
    ours = load_model(resolve(str(directory)), LoadOptions(), head="ctc")
    x = torch.from_numpy(ck.audio(0.8, seed=6))[None]
    with torch.no_grad():
        assert_close(ours(x), reference(x).logits)


def test_base_head_gives_hidden_states(tmp_path):
    directory, reference = ck.build("large", tmp_path)
    ours = load_model(resolve(str(directory)), LoadOptions(), head="base")
    assert isinstance(ours, Wav2Vec2Model)
    x = torch.from_numpy(ck.audio(0.8, seed=7))[None]
    with torch.no_grad():
        assert_close(ours(x), reference.wav2vec2(x).last_hidden_state)


def test_unsupported_configs_are_refused(tmp_path):
    directory, _ = ck.build("base", tmp_path)
    config = json.loads((directory / "config.json").read_text())
    with pytest.raises(ModelLoadFailed, match="no 'causal_lm' head"):
        load_model(resolve(str(directory)), LoadOptions(), head="causal_lm")
    (directory / "config.json").write_text(json.dumps({**config, "adapter_attn_dim": 16}))
    with pytest.raises(ModelLoadFailed, match="adapters"):
        load_model(resolve(str(directory)), LoadOptions(), head="ctc")
    (directory / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    with pytest.raises(ModelLoadFailed) as info:
        load_model(resolve(str(directory)), LoadOptions(), head="ctc")
    assert info.value.reason == "WEIGHTS_MISMATCH"
