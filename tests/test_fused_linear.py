"""The fuse pass (layers/fused_linear.py): sibling projections become one nn.Linear whose rows are
the parts' rows, the parts are gone (no second copy of the weights), the fused layer's output is
the parts' outputs side by side, and a Gemma 3 model after the pass computes the logits it
computed before it (float32 and through the int8 pass that follows)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from generation_checkpoints import build
from harness import load_pipeline

from pipeserve.layers.fused_linear import fuse_linears, fuse_projections
from pipeserve.layers.quantization import Int8Linear, quantize_int8


class Owner(nn.Module):
    def __init__(self, bias: bool, sizes=(8, 4, 4)):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = (nn.Linear(6, n, bias=bias) for n in sizes)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_weight_is_the_parts_stacked_and_replaces_them(bias):
    owner = Owner(bias)
    parts = [owner.a, owner.b, owner.c]
    x = torch.randn(3, 5, 6)
    expected = torch.cat([p(x) for p in parts], dim=-1)
    weights = [p.weight.detach().clone() for p in parts]
    assert fuse_linears(owner, ("a", "b", "c"), "abc")
    assert type(owner.abc) is nn.Linear and (owner.abc.in_features, owner.abc.out_features) == (6, 16)
    assert torch.equal(owner.abc.weight, torch.cat(weights))
    if bias:
        assert torch.equal(owner.abc.bias, torch.cat([p.bias.detach() for p in parts]))
    else:
        assert owner.abc.bias is None
    assert not any(hasattr(owner, name) for name in ("a", "b", "c"))
    assert [name for name, _ in owner.named_parameters()] == ["abc.weight"] + (["abc.bias"] if bias else [])
    torch.testing.assert_close(owner.abc(x), expected, rtol=0, atol=1e-6)


def test_parts_that_cannot_fuse_stay():
    mixed = Owner(False)
    mixed.c = nn.Linear(6, 4, bias=True)  # bias on one part only
    assert not fuse_linears(mixed, ("a", "b", "c"), "abc")
    assert all(isinstance(getattr(mixed, n), nn.Linear) for n in "abc") and not hasattr(mixed, "abc")
    quantized = quantize_int8(Owner(False))  # no longer nn.Linear: a later pass already ran
    assert not fuse_linears(quantized, ("a", "b"), "ab")
    assert isinstance(quantized.a, Int8Linear)
    wider = Owner(False)
    wider.b = nn.Linear(7, 4)  # another input size
    assert not fuse_linears(wider, ("a", "b"), "ab")


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gemma3-fuse")
    build("gemma3", directory, special_tokens=True)
    return directory


def _unfused(directory):
    from pipeserve.checkpoints.hub import resolve
    from pipeserve.models import gemma3
    from pipeserve.pipelines.base import LoadOptions

    return gemma3.load_model(resolve(str(directory)), LoadOptions(), "causal_lm").eval()


def test_gemma_pipeline_runs_fused_and_holds_no_copy(gemma_dir):
    pipe = load_pipeline(gemma_dir)
    unfused = _unfused(gemma_dir)
    try:
        layers = pipe.model.model.layers
        assert all(layer.self_attn.qkv_proj is not None and layer.mlp.gate_up_proj is not None for layer in layers)
        assert not any(hasattr(layer.self_attn, "q_proj") or hasattr(layer.mlp, "up_proj") for layer in layers)
        fused = _unfused(gemma_dir)
        before = sum(p.numel() for p in fused.parameters())
        assert fuse_projections(fused) == 2 * len(layers)
        assert sum(p.numel() for p in fused.parameters()) == before  # replaced, not added
        ids = torch.randint(3, 200, (2, 11), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            torch.testing.assert_close(fused(ids), unfused(ids), rtol=0, atol=1e-5)
            torch.testing.assert_close(pipe.model(ids), unfused(ids), rtol=0, atol=1e-4)
    finally:
        pipe.close()


def test_gemma_int8_quantizes_the_fused_projections_as_the_parts(gemma_dir):
    """Per-output-row int8 scales: fusing before quantizing changes nothing but the GEMM count."""
    fused, unfused = _unfused(gemma_dir), _unfused(gemma_dir)
    fuse_projections(fused)
    quantize_int8(fused, kernel="weight_only")
    quantize_int8(unfused, kernel="weight_only")
    attn_f, attn_u = fused.model.layers[0].self_attn, unfused.model.layers[0].self_attn
    assert isinstance(attn_f.qkv_proj, Int8Linear)
    assert torch.equal(attn_f.qkv_proj.weight, torch.cat([attn_u.q_proj.weight, attn_u.k_proj.weight,
                                                         attn_u.v_proj.weight]))
    ids = torch.randint(3, 200, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids), unfused(ids), rtol=0, atol=1e-4)
