"""int8 weight-only quantization and device_map="auto" planning (with made-up memory numbers:
this machine has no GPU)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from generation_checkpoints import build
from harness import load_pipeline

from pipeserve.layers.device_map import dispatch, plan_device_map
from pipeserve.errors import ModelLoadFailed
from pipeserve.layers.quantization import Int8Linear, quantize_per_channel

GB = 1 << 30


def test_per_channel_rounding_error_is_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(16, 64) * torch.logspace(-2, 1, 16)[:, None]  # very different row ranges
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (16,)
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()


def test_int8_linear_matches_dequantized_float():
    torch.manual_seed(1)
    linear = nn.Linear(64, 48)
    x = torch.randn(2, 5, 64)
    weight_only = Int8Linear(linear, kernel="weight_only")
    dequantized = weight_only.weight.float() * weight_only.scale[:, None]
    expected = x @ dequantized.t() + linear.bias
    assert torch.allclose(weight_only(x), expected, atol=1e-4)
    # the CPU default (fbgemm, activations quantized too) stays within ~1% of the range
    fast = Int8Linear(linear)
    assert fast._fbgemm is not None
    assert (fast(x) - expected).abs().max() < 0.02 * expected.abs().max()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("int8-gpt2")
    build("gpt2", directory)
    return directory


def test_load_in_8bit_pipeline(checkpoint):
    full = load_pipeline(checkpoint)
    int8 = load_pipeline(checkpoint, load_in_8bit=True)
    try:
        assert any(isinstance(m, Int8Linear) for m in int8.model.modules())
        assert not any(isinstance(m, nn.Linear) for m in int8.model.modules())
        assert int8.memory_bytes() < full.memory_bytes()
        ids = torch.tensor([full.encode("The quick brown fox")])
        with torch.no_grad():
            a, b = full.model(ids), int8.model(ids)
        # int8 rounding moves logits by a small fraction of their range
        assert (a - b).abs().max() < 0.05 * a.abs().max()
        [result] = int8.generate(["The quick brown fox"], {"max_new_tokens": 10, "min_new_tokens": 10})
        assert result.sequences[0].generated_tokens == 10
    finally:
        full.close()
        int8.close()


def test_plan_fills_gpus_in_order_then_cpu():
    plan = plan_device_map(head_bytes=1 * GB, layer_bytes=[1 * GB] * 10,
                           free=[("cuda:0", 5 * GB), ("cuda:1", 4 * GB), ("cpu", 64 * GB)], reserve_fraction=0.0)
    assert plan.head == "cuda:0"
    assert plan.layers == ["cuda:0"] * 4 + ["cuda:1"] * 4 + ["cpu"] * 2


def test_plan_keeps_headroom_and_skips_a_full_gpu():
    plan = plan_device_map(head_bytes=2 * GB, layer_bytes=[1 * GB] * 4,
                           free=[("cuda:0", 1 * GB), ("cuda:1", 10 * GB), ("cpu", 64 * GB)], reserve_fraction=0.2)
    assert plan.head == "cuda:1"  # cuda:0 cannot hold the 2 GB head
    assert plan.layers == ["cuda:1"] * 4  # 8 GB usable: 2 head + 4 layers
    plan = plan_device_map(head_bytes=0, layer_bytes=[3 * GB] * 3, free=[("cuda:0", 10 * GB), ("cpu", 64 * GB)],
                           reserve_fraction=0.2)
    assert plan.layers == ["cuda:0", "cuda:0", "cpu"]  # 8 GB usable on the GPU


def test_plan_refuses_what_does_not_fit():
    with pytest.raises(ModelLoadFailed, match="does not fit"):
        plan_device_map(head_bytes=0, layer_bytes=[4 * GB] * 3, free=[("cuda:0", 5 * GB), ("cpu", 5 * GB)],
                        reserve_fraction=0.0)


def test_auto_device_map_generates_as_without(checkpoint):
    plain = load_pipeline(checkpoint)
    auto = load_pipeline(checkpoint, device="auto")
    try:
        assert auto.model.layer_devices == [torch.device("cpu")] * 2
        options = {"max_new_tokens": 12, "min_new_tokens": 12}
        assert auto.generate(["Hello world"], options)[0].sequences[0].text == \
            plain.generate(["Hello world"], options)[0].sequences[0].text
        # a split across two (here both CPU) budgets moves the hidden state between layers
        plan = dispatch(auto.model, free=[("cpu", 1), ("cpu", 1 << 40)])
        assert plan.layers == ["cpu", "cpu"] and plan.head == "cpu"
        assert auto.generate(["Hello world"], options)[0].sequences[0].text == \
            plain.generate(["Hello world"], options)[0].sequences[0].text
    finally:
        plain.close()
        auto.close()
