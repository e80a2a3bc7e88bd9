"""Grouped int4 planes (layers/grid_int4.py, torch's int4 kernel; the native kernel's tests are in
test_grid_native.py): the grids of a GGUF's block types are found from
the dequantized floats alone and held exactly (up to the kernel's bfloat16 scales and zeros,
a bound computed here), 16-level tensors take one plane and the rest two, weights on no grid
take the nearest 8-bit grid, and a row's output is bitwise the same in any batch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeserve.layers import grid_int4
from pipeserve.layers.grid_int4 import GROUP, GridInt4Linear, detect_grids, encode_planes

pytestmark = pytest.mark.skipif(not grid_int4.available(), reason="no int4 CPU kernel / bfloat16 support here")

BF16_ROUNDING = 2.0 ** -8  # bfloat16's unit roundoff: 8 significant bits, round to nearest


def _f16(x: torch.Tensor) -> torch.Tensor:
    """A GGUF block's scale: stored as float16, used as float32."""
    return x.half().float()


def q4k_like(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Q4_K's sub-blocks as the gguf package dequantizes them (float32): per 32 weights
    d * sc * q - dmin * m, q in 0..15, sc and m 6-bit. Some groups skip levels: the top and
    bottom ones, or every other one (their smallest gap is two steps)."""
    g = torch.Generator().manual_seed(seed)
    groups = cols // GROUP
    d = _f16(torch.rand(rows, 1, generator=g) * 2e-3 + 1e-4)
    dmin = _f16(torch.rand(rows, 1, generator=g) * 2e-3 + 1e-4)
    sc = torch.randint(1, 64, (rows, groups), generator=g).float()
    m = torch.randint(0, 64, (rows, groups), generator=g).float()
    q = torch.randint(0, 16, (rows, groups, GROUP), generator=g).float()
    q[0, 0] = torch.randint(3, 12, (GROUP,), generator=g).float()  # no top or bottom level
    q[0, 1] = torch.randint(0, 8, (GROUP,), generator=g).float() * 2  # even levels only
    q[1, 0] = torch.tensor([0.0, 2.0, 5.0] * 10 + [2.0, 2.0])  # gaps of 2 and 3 steps: the step is 1
    scale = (d * sc)[..., None]  # float32, exact (11 x 6 bits)
    return (scale * q - (dmin * m)[..., None]).reshape(rows, cols)


def q5_0_like(rows: int, cols: int, seed: int = 1) -> torch.Tensor:
    """Q5_0: d * (q - 16), q in 0..31."""
    g = torch.Generator().manual_seed(seed)
    d = _f16(torch.rand(rows, cols // GROUP, 1, generator=g) * 3e-3 + 1e-4)
    q = torch.randint(0, 32, (rows, cols // GROUP, GROUP), generator=g).float()
    return (d * (q - 16)).reshape(rows, cols)


def q8_0_like(rows: int, cols: int, seed: int = 2) -> torch.Tensor:
    """Q8_0: d * q, q in -127..127."""
    g = torch.Generator().manual_seed(seed)
    d = _f16(torch.rand(rows, cols // GROUP, 1, generator=g) * 1e-3 + 1e-5)
    q = torch.randint(-127, 128, (rows, cols // GROUP, GROUP), generator=g).float()
    return (d * q).reshape(rows, cols)


def gguf_roundtrip(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """`weight` quantized and dequantized by the gguf package (the loader's reader)."""
    import gguf
    from gguf.quants import dequantize, quantize

    kind = gguf.GGMLQuantizationType[qtype]
    return torch.from_numpy(np.ascontiguousarray(dequantize(quantize(weight.numpy(), kind), kind)))


SYNTHETIC = {"Q4_K": q4k_like, "Q5_0": q5_0_like, "Q8_0": q8_0_like}


@pytest.mark.parametrize("kind, planes", [("Q4_K", 1), ("Q5_0", 2), ("Q8_0", 2)])
def test_grids_of_gguf_block_types_are_found_exactly(kind, planes):
    weight = SYNTHETIC[kind](64, 256)
    grids = detect_grids(weight)
    assert bool(grids.exact.all())
    assert torch.equal(grids.values(), weight.double())  # every weight is origin + step * level
    assert grids.planes() == planes


@pytest.mark.parametrize("qtype, planes", [("Q4_0", 1), ("Q5_0", 2), ("Q8_0", 2)])
def test_grids_of_the_gguf_packages_own_blocks(qtype, planes):
    """The same from the gguf package's quantize/dequantize (what a GGUF load reads)."""
    weight = gguf_roundtrip(torch.randn(48, 128, generator=torch.Generator().manual_seed(3)) * 0.05, qtype)
    grids = detect_grids(weight)
    assert bool(grids.exact.all())
    assert torch.equal(grids.values(), weight.double())
    assert grids.planes() == planes


def _scale_rounding_bound(weight: torch.Tensor, grids, encoded) -> torch.Tensor:
    """[N, K]: what bfloat16 scales and zeros can move a weight of an exact grid. The kernel
    computes s' * c + z' with s' = bf16(s), z' = bf16(z) where the weight is s * c + z exactly,
    so the error is at most |c| |s' - s| + |z' - z| <= 2^-8 (|c| s + |z|) <= 2^-8 (|w| + 2 |z|);
    z is the encoding's zero (summed over planes), read back from its scales_and_zeros."""
    n, k = weight.shape
    zero = encoded.scales_and_zeros[..., 1].double().t().reshape(n, encoded.planes, k // GROUP).sum(dim=1)
    zero = zero.repeat_interleave(GROUP, dim=1)
    return BF16_ROUNDING * (weight.double().abs() + 2 * zero.abs()) * (1 + 2 ** -20)


@pytest.mark.parametrize("kind", sorted(SYNTHETIC))
def test_planes_hold_the_grid_up_to_the_bfloat16_scale_rounding(kind):
    weight = SYNTHETIC[kind](64, 256)
    grids = detect_grids(weight)
    encoded, codes = encode_planes(grids)
    assert encoded.planes == grids.planes()
    assert codes.shape == (64, encoded.planes * 256) and int(codes.min()) >= 0 and int(codes.max()) <= 15
    held = encoded.dequantized(64, 256, codes)
    error = (held - weight.double()).abs()
    assert (error <= _scale_rounding_bound(weight, grids, encoded)).all()
    # the zero is centred: never further from 0 than the group's largest weight, and within
    # 8 1/2 steps of 0 where the group's range holds 0 (two planes span levels -136..119)
    zero = encoded.scales_and_zeros[..., 1].double().t().reshape(64, encoded.planes, -1).sum(dim=1)
    groups = weight.double().view(64, -1, GROUP)
    largest = groups.abs().amax(dim=-1)
    assert (zero.abs() <= largest * (1 + BF16_ROUNDING)).all()
    straddles = (groups.amin(dim=-1) <= 0) & (groups.amax(dim=-1) >= 0)
    assert (zero.abs() <= 8.5 * grids.step * (1 + BF16_ROUNDING) + 1e-12)[straddles].all()
    # so each group's error stays within ~2^-8 of its largest weight, like bfloat16 weights
    assert (error.view(64, -1, GROUP) <= 3 * BF16_ROUNDING * largest[..., None] + 1e-12).all()


def test_the_packed_planes_are_what_the_kernel_multiplies():
    """The kernel's product equals bf16(x) @ dequantized^T up to float32 sums and the bfloat16
    output (the dequantized form above is the kernel's, not only our reading of it)."""
    weight = torch.cat([q5_0_like(32, 128), q8_0_like(32, 128)])
    encoded, codes = encode_planes(detect_grids(weight))
    x = torch.randn(5, 128)
    reference = x.bfloat16().double() @ encoded.dequantized(64, 128, codes).t()
    got = GridInt4Linear(_linear(weight), kernel="int4")(x).double()
    assert ((got - reference).abs() <= BF16_ROUNDING * reference.abs() + 1e-5 * reference.abs().max()).all()


def test_sixteen_levels_take_one_plane_and_any_wider_group_two():
    q4k = q4k_like(32, 256)
    assert detect_grids(q4k).planes() == 1
    mixed = q4k.clone()
    mixed[5, 64:96] = q5_0_like(1, 32)[0]  # one 32-level group
    assert detect_grids(mixed).planes() == 2
    # two planes hold the 16-level grid as well (the same values, twice the bytes)
    one, _ = encode_planes(detect_grids(q4k), planes=1)
    two, _ = encode_planes(detect_grids(q4k), planes=2)
    assert two.packed.numel() == 2 * one.packed.numel()
    x = torch.randn(3, 256)
    y1 = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), one.packed, GROUP, one.scales_and_zeros)
    y2 = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.cat([x, x], 1).bfloat16(), two.packed, GROUP,
                                                    two.scales_and_zeros)
    # each form rounds its own scales and zeros to bfloat16 (2^-8 of |w| + 2 |zero| each, the
    # zero at most the group's largest weight) and its output
    magnitude = x.abs() @ q4k.abs().view(32, -1, GROUP).amax(-1).repeat_interleave(GROUP, 1).t()
    assert ((y1.float() - y2.float()).abs() <= 2 * 3 * BF16_ROUNDING * magnitude + 1e-4).all()


def test_weights_on_no_grid_take_the_nearest_eight_bit_grid():
    """Float weights (and Q6_K's two scales per 32): levels over the group's range in 255
    steps, each weight within half a step."""
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(4))
    weight[0, :32] = 0.25  # a constant group: exact, step 0
    grids = detect_grids(weight)
    assert bool(grids.exact[0, 0]) and float(grids.step[0, 0]) == 0.0
    assert not bool(grids.exact.flatten()[1:].any())
    groups = weight.double().view(32, -1, GROUP)
    span = groups.amax(-1) - groups.amin(-1)
    assert torch.allclose(grids.step, span / 255)
    assert int(grids.levels.view(32, -1, GROUP)[1:].amax(-1).min()) == 255  # the range is used
    error = (grids.values() - weight.double()).abs().view(32, -1, GROUP)
    assert (error <= grids.step[..., None] / 2 * (1 + 1e-6)).all()
    assert grids.planes() == 2


def _linear(weight: torch.Tensor, bias: bool = False) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear.requires_grad_(False)


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_0"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_the_float_linear(kind, bias):
    linear = _linear(SYNTHETIC[kind](48, 256), bias)
    layer = GridInt4Linear(linear, kernel="int4")
    x = torch.randn(2, 7, 256)
    got, expected = layer(x), linear(x)
    assert got.shape == (2, 7, 48) and got.dtype == torch.float32
    # bfloat16 input, scales and output: a few 2^-8 of the products' magnitudes
    magnitude = x.abs() @ linear.weight.abs().t()
    assert ((got - expected).abs() <= 4 * BF16_ROUNDING * magnitude + 1e-6).all()


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_0"])
def test_a_row_is_computed_the_same_in_any_batch(kind):
    """Each row alone and in batches of 2..16 rows of very different scales: bitwise equal."""
    layer = GridInt4Linear(_linear(SYNTHETIC[kind](64, 256)), kernel="int4")
    crowd = torch.randn(16, 256, generator=torch.Generator().manual_seed(5)) * torch.logspace(-2, 2, 16)[:, None]
    alone = torch.cat([layer(crowd[i:i + 1]) for i in range(16)])
    for size in (2, 3, 5, 8, 16):
        assert torch.equal(layer(crowd[:size]), alone[:size]), f"batch of {size}"
    assert torch.equal(layer(crowd.flip(0)), alone.flip(0))


def test_only_the_shapes_the_kernel_takes_are_converted():
    """K in whole groups of 32 and N in blocks of 16; any other linear stays float, as do the skipped."""
    model = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 32), nn.Linear(32, 32), nn.Linear(32, 24))
    kept = model[0]
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = model(x)
    assert grid_int4.quantize_grid_int4(model, skip={id(kept)}) == 1
    assert [type(m).__name__ for m in model] == ["Linear", "Linear", "GridInt4Linear", "Linear"]
    assert model[0] is kept
    with torch.no_grad():
        assert torch.allclose(model(x), expected, rtol=0.05, atol=0.05)


def test_refusal_names_the_reason():
    assert grid_int4.unavailable_reason(torch.device("cpu")) is None
    assert "CPU" in grid_int4.unavailable_reason(torch.device("meta"))
