"""int8 weight-only quantization and device_map="auto" planning (with made-up memory numbers:
this machine has no GPU)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from generation_checkpoints import build
from harness import PARITY_ATOL, assert_close, load_pipeline

from pipeserve.layers.device_map import dispatch, plan_device_map
from pipeserve.errors import ModelLoadFailed
from pipeserve.layers.quantization import Int8Linear, quantize_int8, quantize_per_channel

GB = 1 << 30


def test_per_channel_rounding_error_is_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(16, 64) * torch.logspace(-2, 1, 16)[:, None]  # very different row ranges
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (16,)
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()


def fake_quantize(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """The reference int8 quantizer, written from the spec independently of ours: symmetric, one
    scale per output channel (reduced over `dim`, the input dimension), scale = max|w| / 127,
    round to nearest; returned dequantized, as float32."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=dim, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(w / scale).clamp(-127, 127) * scale


def test_int8_linear_matches_fake_quantized_reference():
    """Weight-only: the same dequantized weights as the reference quantizer, so only float32
    accumulation order differs (1e-5 on outputs of size ~10). The CPU default (fbgemm) also
    rounds activations, per tensor, to 7 bits (reduce_range): each input x_i moves by at most
    half a step, step = (max x - min x) / 127 (the range always includes 0), so output j moves
    by at most step / 2 * sum_i |w_ij| (w dequantized) -- the bound checked per element."""
    torch.manual_seed(1)
    linear = nn.Linear(64, 48)
    x = torch.randn(2, 5, 64)
    reference = x @ fake_quantize(linear.weight, 1).t() + linear.bias
    weight_only = Int8Linear(linear, kernel="weight_only")
    torch.testing.assert_close(weight_only(x), reference, atol=1e-5, rtol=0)
    fast = Int8Linear(linear)
    assert fast._fbgemm is not None
    flat = x.reshape(-1, 64)
    step = (flat.max().clamp(min=0) - flat.min().clamp(max=0)) / 127
    bound = step / 2 * fake_quantize(linear.weight, 1).abs().sum(dim=1) + 1e-5
    error = (fast(x) - reference).abs().reshape(-1, 48)
    assert (error <= bound).all(), f"max excess {(error - bound).max().item():.3g}"
    assert error.max() > 0  # activations really are rounded on this path (else the bound tests nothing)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("int8-gpt2")
    build("gpt2", directory)
    return directory


def _fake_quantized_transformers(directory):
    """transformers' GPT-2 with the weights our load_in_8bit quantizes (every Conv1D in the
    blocks, and the LM head as its own copy: the tied embedding stays float) replaced by the
    reference quantizer's dequantized weights: an int8 oracle for our int8 model."""
    import transformers

    reference = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    with torch.no_grad():
        for module in reference.transformer.h.modules():
            if type(module).__name__ == "Conv1D":  # [in, out]: output channels are columns
                module.weight.copy_(fake_quantize(module.weight, 0))
        reference.lm_head.weight = nn.Parameter(fake_quantize(reference.transformer.wte.weight, 1))
    return reference


def test_load_in_8bit_pipeline(checkpoint):
    full = load_pipeline(checkpoint)
    int8 = load_pipeline(checkpoint, load_in_8bit=True)
    weight_only = load_pipeline(checkpoint, packed_linear=False)
    reference = _fake_quantized_transformers(checkpoint)
    try:
        assert any(isinstance(m, Int8Linear) for m in int8.model.modules())
        assert not any(isinstance(m, nn.Linear) for m in int8.model.modules())
        assert int8.memory_bytes() < full.memory_bytes()
        # Every quantized weight the loading path produced is the reference quantizer's.
        layers = [m for m in int8.model.modules() if isinstance(m, Int8Linear)]
        assert len(layers) == 4 * reference.config.n_layer + 1
        ref_weights = sorted((fake_quantize(m.weight, 0).t() for m in reference.transformer.h.modules()
                              if type(m).__name__ == "Conv1D"), key=lambda w: (w.shape, w.sum().item()))
        ref_weights.append(reference.lm_head.weight.detach())
        ours = sorted((m.weight.float() * m.scale.float()[:, None] for m in layers[:-1]),
                      key=lambda w: (w.shape, w.sum().item()))
        ours.append(layers[-1].weight.float() * layers[-1].scale.float()[:, None])
        for a, b in zip(ours, ref_weights, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        # The weight-only kernel on the whole model: the reference int8 model's logits, to float32
        # accumulation order (PARITY_ATOL), and its greedy tokens.
        quantize_int8(weight_only.model, kernel="weight_only")
        ids = torch.tensor([full.encode("The quick brown fox")])
        with torch.no_grad():
            expected = reference(ids).logits
            assert_close(weight_only.model(ids), expected)
            # int8 really moved the logits (else this test could not tell int8 from float32)
            assert (full.model(ids) - expected).abs().max() > 100 * PARITY_ATOL
            tokens = reference.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                        pad_token_id=reference.config.eos_token_id)[0, ids.shape[1]:].tolist()
        [result] = weight_only.generate(["The quick brown fox"], {"max_new_tokens": 10, "min_new_tokens": 10})
        assert [t.token for t in result.sequences[0].tokens] == tokens
        [result] = int8.generate(["The quick brown fox"], {"max_new_tokens": 10, "min_new_tokens": 10})
        assert result.sequences[0].generated_tokens == 10
    finally:
        full.close()
        int8.close()
        weight_only.close()


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
