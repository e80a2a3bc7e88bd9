"""The one activation table (layers/activations.py): every activation name a family accepted
before the tables were merged is still accepted by that family, every family fails an unknown
name the same way (UNSUPPORTED_CONFIG), and the packed linear's fused post-ops are entries of the
same table."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeserve.errors import ModelLoadFailed
from pipeserve.layers import activations
from pipeserve.models import bart, bert, distilbert, gpt2, layoutlm, llama, opt, vit, wav2vec2, whisper

# The names each family's own table held before there was one table (the regression record).
_CAUSAL = {"gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish", "quick_gelu"}
_ENCODER = {"gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish", "tanh"}
ACCEPTED_BEFORE = {
    "gpt2": _CAUSAL, "opt": _CAUSAL, "llama": _CAUSAL,
    "bert": _ENCODER, "distilbert": _ENCODER, "layoutlm": _ENCODER, "bart": _ENCODER, "wav2vec2": _ENCODER,
    "vit": _ENCODER | {"gelu_fast", "quick_gelu"},
    "whisper": {"gelu", "gelu_new", "relu"},
}
POST_OPS_BEFORE = {"gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu"}

# family -> (config class, the config fields naming activations, the module built from it)
FAMILIES = {
    "gpt2": (gpt2.GPT2Config, ["activation_function"], gpt2.GPT2LMHeadModel),
    "opt": (opt.OPTConfig, ["activation_function"], opt.OPTForCausalLM),
    "llama": (llama.LlamaConfig, ["hidden_act"], llama.LlamaForCausalLM),
    "bert": (bert.BertConfig, ["hidden_act"], bert.BertModel),
    "distilbert": (distilbert.DistilBertConfig, ["activation"], distilbert.DistilBertModel),
    "layoutlm": (layoutlm.LayoutLMConfig, ["hidden_act"], layoutlm.LayoutLMModel),
    "bart": (bart.BartConfig, ["activation_function"], bart.BartForSequenceClassification),
    "vit": (vit.ViTConfig, ["hidden_act"], vit.ViTModel),
    "wav2vec2": (wav2vec2.Wav2Vec2Config, ["hidden_act", "feat_extract_activation"], wav2vec2.Wav2Vec2Model),
    "whisper": (whisper.WhisperConfig, ["activation_function"], whisper.WhisperForConditionalGeneration),
}


def _build(family: str, name: str):
    config_cls, fields, module_cls = FAMILIES[family]
    config = dataclasses.replace(config_cls(), **{f: name for f in fields})
    with torch.device("meta"):  # shapes only: the default configs are full size
        return module_cls(config)


def test_the_table_holds_every_name_any_family_accepted():
    assert set().union(*ACCEPTED_BEFORE.values()) <= set(activations.ACT2FN)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_still_accepts_its_names(family):
    for name in sorted(ACCEPTED_BEFORE[family]):
        _build(family, name)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_an_unknown_activation_fails_with_the_one_reason(family):
    with pytest.raises(ModelLoadFailed) as failure:
        _build(family, "no_such_activation")
    assert failure.value.reason == "UNSUPPORTED_CONFIG"
    assert "no_such_activation" in str(failure.value)


def test_activation_functions_are_transformers_ones():
    x = torch.linspace(-4, 4, 101)
    expected = {
        "gelu": torch.nn.functional.gelu(x),
        "gelu_new": 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3))),
        "relu": x.clamp(min=0), "silu": x * torch.sigmoid(x), "swish": x * torch.sigmoid(x),
        "tanh": torch.tanh(x), "quick_gelu": x * torch.sigmoid(1.702 * x),
    }
    for name, value in expected.items():
        torch.testing.assert_close(activations.activation(name)(x), value, rtol=1e-5, atol=1e-6)


def test_fused_post_ops_are_entries_of_the_table():
    assert set(activations.ONEDNN_POST_OPS) == POST_OPS_BEFORE
    assert set(activations.ONEDNN_POST_OPS) <= set(activations.ACT2FN)
