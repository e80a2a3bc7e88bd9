"""Weight-only int8 linears (layers/weight_only.py): int8 per-channel weights with bfloat16
activations stay within the error those two roundings allow of the float32 linear, keep the
input's shape and dtype, and the load_in_8bit pass uses them only for families that take them."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeserve.layers import weight_only

pytestmark = pytest.mark.skipif(not weight_only.available(torch.ones(1, 1)),
                                reason="no native bfloat16 or no weight-only int8 kernel on this CPU")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 96), (2, 7, 96), (5, 96), (33, 96)])  # 14 and 33 rows: the widened GEMM
def test_matches_the_float_linear_within_the_rounding_bound(bias, shape):
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias)
    with torch.no_grad():
        linear.weight[3, 5] = 2.0  # an outlier row: a coarse scale, still bounded per row
    layer = weight_only.WeightOnlyInt8Linear(linear)
    x = torch.randn(*shape) * 4
    got = layer(x)
    assert got.shape == (*shape[:-1], 200) and got.dtype == torch.float32
    expected = linear(x).detach()
    # per row: int8 rounding (<= scale/2 per weight) and bfloat16 activations (2^-9 relative),
    # bfloat16 output (2^-9 relative)
    w = linear.weight.detach()
    scale = w.abs().amax(dim=1) / 127
    x_flat = x.reshape(-1, 96)
    bound = (scale[None, :] / 2 * x_flat.abs().sum(-1, keepdim=True)
             + 2.0 ** -8 * (x_flat.abs() @ w.abs().T) + 2.0 ** -8 * expected.reshape(-1, 200).abs() + 1e-5)
    assert ((got - expected).reshape(-1, 200).abs() <= bound).all()


def test_quantize_replaces_every_cpu_float_linear():
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8, bias=False))
    x = torch.randn(3, 32)
    expected = model(x).detach()
    weight_only.quantize_weight_only(model)
    assert [type(m).__name__ for m in model] == ["WeightOnlyInt8Linear", "GELU", "WeightOnlyInt8Linear"]
    assert model[0].weight.dtype == torch.int8 and model[0].scale.dtype == torch.bfloat16
    torch.testing.assert_close(model(x), expected, rtol=0.05, atol=0.05)


def test_the_pass_uses_weight_only_only_for_families_that_take_it():
    from pipeserve.layers.passes import PostLoad, apply_post_load_passes
    from pipeserve.layers.quantization import Int8Linear
    from pipeserve.pipelines.base import LoadOptions

    class Family(nn.Module):
        def __init__(self, takes: frozenset):
            super().__init__()
            self.post_load = takes
            self.proj = nn.Linear(16, 16)

    options = LoadOptions(load_in_8bit=True)
    plain, weight_only_family = Family(frozenset({"int8"})), Family(frozenset({"int8", "weight_only_int8"}))
    apply_post_load_passes(plain, PostLoad(options))
    apply_post_load_passes(weight_only_family, PostLoad(options))
    assert isinstance(plain.proj, Int8Linear)
    assert isinstance(weight_only_family.proj, weight_only.WeightOnlyInt8Linear)
