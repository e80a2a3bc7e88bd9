"""Int8 linears with per-row int8 activations (layers/row_int8.py): within the error their
roundings allow of the float32 linear, and batch-invariant: a row's output is bitwise the same
whatever other rows share its call (fbgemm's dynamic int8 takes one activation scale per batch,
so there a row's output depends on its neighbours)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeserve.layers import row_int8

pytestmark = pytest.mark.skipif(not row_int8.available(), reason="no oneDNN int8 linear / VNNI on this CPU")


def _linear(bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(96, 200, bias=bias)
    with torch.no_grad():
        linear.weight[3, 5] = 2.0  # an outlier row: a coarse scale, still bounded per row
    return linear.requires_grad_(False)


@pytest.mark.parametrize("residual_rows", [True, False])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 96), (2, 7, 96), (5, 96), (33, 96)])
def test_matches_the_float_linear_within_the_rounding_bound(bias, shape, residual_rows):
    linear = _linear(bias)
    layer = row_int8.RowInt8Linear(linear, residual_rows=residual_rows)
    x = torch.randn(*shape) * 4
    x[..., 7] = 60.0  # one large activation per row (Gemma has them): a coarse activation scale
    got = layer(x)
    assert got.shape == (*shape[:-1], 200) and got.dtype == torch.float32
    expected = linear(x)
    w, flat = linear.weight, x.reshape(-1, 96)
    weight_step = w.abs().amax(dim=1) / 127  # per output channel
    # activation step per row: the int8 step, or its residual's (step / 254)
    act_step = flat.abs().amax(dim=1, keepdim=True) / 127 / (254 if residual_rows else 1)
    bound = (weight_step[None, :] / 2 * flat.abs().sum(-1, keepdim=True)
             + act_step / 2 * w.abs().sum(-1)[None, :] + 1e-4 * expected.reshape(-1, 200).abs() + 1e-4)
    assert ((got - expected).reshape(-1, 200).abs() <= bound).all()
    if residual_rows:  # the residual row leaves the weight's rounding: a much tighter result
        plain = row_int8.RowInt8Linear(linear, residual_rows=False)(x)
        assert (got - expected).abs().max() < (plain - expected).abs().max()


@pytest.mark.parametrize("residual_rows", [True, False])
def test_a_row_is_computed_the_same_in_any_batch(residual_rows):
    """Each row alone and inside batches of 2..24 rows of very different scales: bitwise equal."""
    layer = row_int8.RowInt8Linear(_linear(True), residual_rows=residual_rows)
    torch.manual_seed(1)
    crowd = torch.randn(24, 96) * torch.logspace(-2, 2, 24)[:, None]
    alone = torch.cat([layer(crowd[i:i + 1]) for i in range(24)])
    for size in (2, 3, 8, 16, 24):
        assert torch.equal(layer(crowd[:size]), alone[:size]), f"batch of {size}"
    assert torch.equal(layer(crowd.flip(0)), alone.flip(0))


def test_fbgemm_dynamic_int8_is_not_batch_invariant():
    """Why this module exists: the same check fails for layers/quantization.Int8Linear."""
    from pipeserve.layers.quantization import Int8Linear

    layer = Int8Linear(_linear(False))
    torch.manual_seed(1)
    crowd = torch.randn(8, 96) * torch.logspace(-2, 2, 8)[:, None]
    alone = torch.cat([layer(crowd[i:i + 1]) for i in range(8)])
    assert not torch.equal(layer(crowd), alone)


def test_zero_rows_stay_zero():
    layer = row_int8.RowInt8Linear(_linear(False))
    got = layer(torch.zeros(3, 96))
    assert torch.equal(got, torch.zeros(3, 200))


def test_quantize_replaces_every_cpu_float_linear_but_the_skipped():
    """Any nn.Linear, a fused projection (one Linear for q, k and v) as much as the others."""
    model = nn.Sequential(nn.Linear(32, 3 * 64), nn.GELU(), nn.Linear(192, 8, bias=False), nn.Linear(8, 8))
    x = torch.randn(3, 32)
    expected = model(x).detach()
    row_int8.quantize_row_int8(model, skip={id(model[3])})
    assert [type(m).__name__ for m in model] == ["RowInt8Linear", "GELU", "RowInt8Linear", "Linear"]
    torch.testing.assert_close(model(x), expected, rtol=0.02, atol=0.02)


def test_the_in_place_residual_quantization_gives_the_general_paths_rows():
    """Linears take quantize_rows' in-place path (no error asked), the int8 head the general one
    (layers/int8_head.py): the same int8 rows, residuals and steps, bitwise, as before the layers'
    path was written in place (abs().amax() steps, round, 254 times the rest, rounded)."""
    torch.manual_seed(3)
    x = torch.randn(9, 96) * torch.logspace(-3, 3, 9)[:, None]
    x[2] = 0.0  # a zero row keeps zeros
    x[4, 7] = 1e4  # one huge activation: a coarse step
    fast, fast_steps, none = row_int8.quantize_rows(x, residual_rows=True)
    general, steps, error = row_int8.quantize_rows(x, residual_rows=True, with_error=True)
    assert none is None and error is not None
    assert torch.equal(fast, general) and torch.equal(fast_steps, steps)
    scaled = x * steps
    expected_rest = ((scaled - scaled.round()) * 254).round()
    assert torch.equal(fast[:9].float(), scaled.round()) and torch.equal(fast[9:].float(), expected_rest)
    assert not fast[[2, 11]].any()
