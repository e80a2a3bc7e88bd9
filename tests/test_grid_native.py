"""pipeserve's native grid kernel (kernels/grid_linear.cpp through layers/grid_native.py and
GridInt4Linear's "native" kernel): float32 products against the dequantized weights for every
grid kind a GGUF holds, bitwise batch and thread-count invariance on both its paths (AVX-512
and the plain C++ one), the shapes it refuses, the fallback to torch's int4 kernel where the
library is missing, and the build's cache key."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from native_kernels import require_native_kernels
from pipeserve.kernels import build, library
from pipeserve.layers import grid_native
from pipeserve.layers.grid_detect import GROUP, detect_grids
from pipeserve.layers.grid_int4 import GridInt4Linear

FLOAT32_ROUNDING = 2.0 ** -24
PATHS = ["best", "portable"]  # the library's own ISA path, and the plain C++ one it always has


@pytest.fixture(scope="module", autouse=True)
def native():
    require_native_kernels()


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def q4_k(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """Q4_K sub-blocks: d * sc * q - dmin * m, q in 0..15 (16 levels: 4 bits)."""
    d, dmin = _f16(torch.rand(rows, 1, generator=g) * 2e-3 + 1e-4), _f16(torch.rand(rows, 1, generator=g) * 2e-3)
    sc = torch.randint(1, 64, (rows, cols // GROUP), generator=g).float()
    m = torch.randint(0, 64, (rows, cols // GROUP), generator=g).float()
    q = torch.randint(0, 16, (rows, cols // GROUP, GROUP), generator=g).float()
    return ((d * sc)[..., None] * q - (dmin * m)[..., None]).reshape(rows, cols)


def _blocks(levels: int, shift: int, scale: float):
    """A block type d * (q - shift), q in 0..levels-1, d float16 per 32 weights."""
    def make(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
        d = _f16(torch.rand(rows, cols // GROUP, 1, generator=g) * scale + scale / 30)
        q = torch.randint(0, levels, (rows, cols // GROUP, GROUP), generator=g).float()
        return (d * (q - shift)).reshape(rows, cols)
    return make


def q6_k_like(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """Q6_K: a scale per 16 weights, so a group of 32 is on no common grid (nearest 8-bit one)."""
    d = _f16(torch.rand(rows, cols // 16, 1, generator=g) * 1e-3 + 1e-5)
    q = torch.randint(-32, 32, (rows, cols // 16, 16), generator=g).float()
    return (d * q).reshape(rows, cols)


def floats(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """A float checkpoint's weights: the nearest 8-bit grid over each group's range."""
    return torch.randn(rows, cols, generator=g) * 0.05


def gguf_q4_0(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """Q4_0 through the gguf package's own quantize/dequantize (what a GGUF load reads)."""
    import gguf
    from gguf.quants import dequantize, quantize

    kind = gguf.GGMLQuantizationType.Q4_0
    weight = (torch.randn(rows, cols, generator=g) * 0.05).numpy()
    return torch.from_numpy(np.ascontiguousarray(dequantize(quantize(weight, kind), kind)))


# kind -> (maker, bits the native form holds it in, every group exactly on its grid)
KINDS = {"Q4_K": (q4_k, 4, True), "Q4_0": (gguf_q4_0, 4, True), "Q5_0": (_blocks(32, 16, 3e-3), 5, True),
         "Q8_0": (_blocks(255, 127, 1e-3), 8, True), "Q6_K": (q6_k_like, 8, False), "float": (floats, 8, False)}


def _linear(weight: torch.Tensor, bias: bool = False) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias:
            linear.bias.normal_()
    return linear.requires_grad_(False)


def _run(x: torch.Tensor, packed: grid_native.NativeGrids, path: str) -> torch.Tensor:
    return grid_native.linear(x, packed, portable=path == "portable")


def _float32_bound(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[M, N] what float32 may move x @ W^T: each weight rounded once (level * step + origin),
    each product, a running sum of K / 16 terms per lane, then 4 levels of lane reduction."""
    k = x.shape[1]
    magnitude = x.double().abs() @ weights.abs().t()
    return (k // 16 + 4 + 2) * FLOAT32_ROUNDING * magnitude * 1.01 + 1e-30


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_products_match_the_dequantized_weights(kind, path):
    make, bits, exact = KINDS[kind]
    g = torch.Generator().manual_seed(len(kind))
    weight = make(40, 320, g)
    grids = detect_grids(weight)
    assert bool(grids.exact.all()) == exact
    packed = grid_native.pack(grids)
    assert packed.bits == bits
    assert packed.panels.shape == (10, 320 // GROUP * 4 * (grid_native.GROUP_BYTES[bits] + 8))
    assert torch.equal(packed.unpacked_levels(), grids.levels)
    held = packed.dequantized()
    # the file's values where the grid is exact; within half an 8-bit step elsewhere
    step = grids.step.repeat_interleave(GROUP, dim=1)
    tolerance = 4 * FLOAT32_ROUNDING * weight.double().abs() + (0 if exact else step * (0.5 + 2 ** -12))  # levels are rounded in float32
    assert ((held - weight.double()).abs() <= tolerance).all()
    for rows in (1, 3, 5, 17, 37):
        x = torch.randn(rows, 320, generator=g) * torch.logspace(-1, 1, rows)[:, None]
        got = _run(x, packed, path)
        assert got.dtype == torch.float32 and got.shape == (rows, 40)
        expected = x.double() @ held.t()
        assert ((got.double() - expected).abs() <= _float32_bound(x, held)).all(), f"{rows} rows"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits", [4, 5, 8])
def test_a_row_is_computed_the_same_in_any_batch(bits, path):
    """Row i of an M-row call is bitwise the 1-row call, for M across the register blocks
    (6 rows) and their remainders, up to 6 rows straight from the grid and past that through
    the dequantized buffer, rows of very different scales, in any order."""
    g = torch.Generator().manual_seed(bits)
    maker = {4: q4_k, 5: KINDS["Q5_0"][0], 8: KINDS["Q8_0"][0]}[bits]
    weight = maker(50, 256, g)  # 50 columns: the last panel of 4 padded
    packed = grid_native.pack(detect_grids(weight))
    assert packed.bits == bits
    crowd = torch.randn(37, 256, generator=g) * torch.logspace(-3, 3, 37)[:, None]
    alone = torch.cat([_run(crowd[i:i + 1], packed, path) for i in range(37)])
    for size in (2, 3, 5, 6, 7, 12, 16, 17, 37):
        assert torch.equal(_run(crowd[:size], packed, path), alone[:size]), f"batch of {size}"
    assert torch.equal(_run(crowd.flip(0), packed, path), alone.flip(0))


@pytest.mark.parametrize("path", PATHS)
def test_thread_count_does_not_change_the_bits(path):
    """Each output column is one thread's: 1 and 2 threads give the same bits (the linear is
    large enough that two threads split it)."""
    g = torch.Generator().manual_seed(7)
    packed = grid_native.pack(detect_grids(_blocks(32, 16, 3e-3)(512, 1024, g)))
    x = torch.randn(37, 1024, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [_run(x[:rows], packed, path) for rows in (1, 16, 37)]
        torch.set_num_threads(2)
        two = [_run(x[:rows], packed, path) for rows in (1, 16, 37)]
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_0"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_uses_the_native_kernel_and_matches_the_float_linear(kind, bias):
    linear = _linear(KINDS[kind][0](48, 256, torch.Generator().manual_seed(3)), bias)
    layer = GridInt4Linear(linear)
    assert layer.kernel == "native" and layer.planes == (1 if kind == "Q4_K" else 2)
    assert layer.bits == (4 if kind == "Q4_K" else 5)
    assert "native kernel" in repr(layer)
    x = torch.randn(2, 7, 256)
    got, expected = layer(x), linear(x)
    assert got.shape == (2, 7, 48) and got.dtype == torch.float32
    # float32 activations and exact grids: float32 rounding, not bfloat16's 2^-8
    bound = _float32_bound(x.reshape(-1, 256), linear.weight.double()).reshape(2, 7, 48) * 4
    assert ((got.double() - expected.double()).abs() <= bound + 1e-6 * bias).all()
    # the forced 8-bit layout holds a 16-level grid as well
    wide = GridInt4Linear(linear, planes=2)
    assert wide.kernel == "native" and wide.bits == 8
    assert ((wide(x).double() - expected.double()).abs() <= bound + 1e-6 * bias).all()


def test_refused_shapes():
    """The op checks its operands; a K beyond its buffer keeps the linear on torch's int4 kernel."""
    g = torch.Generator().manual_seed(9)
    packed = grid_native.pack(detect_grids(_blocks(32, 16, 3e-3)(16, 64, g)), bits=8)
    with pytest.raises(RuntimeError, match="panels have"):
        torch.ops.pipeserve.grid_linear(torch.randn(2, 96), packed.panels, 16, 8)
    with pytest.raises(RuntimeError, match="cannot hold 17 output columns"):
        torch.ops.pipeserve.grid_linear(torch.randn(2, 64), packed.panels, 17, 8)
    with pytest.raises(RuntimeError, match="panels have"):
        torch.ops.pipeserve.grid_linear(torch.randn(2, 64), packed.panels, 16, 5)
    with pytest.raises(RuntimeError, match="bits must be 4, 5 or 8"):
        torch.ops.pipeserve.grid_linear(torch.randn(2, 64), packed.panels, 16, 6)
    with pytest.raises(RuntimeError, match="K must be a positive multiple"):
        torch.ops.pipeserve.grid_linear(torch.randn(2, 48), packed.panels, 16, 8)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        torch.ops.pipeserve.grid_linear(torch.randn(64, 2).t(), packed.panels, 16, 8)
    with pytest.raises(ValueError, match="4 bits cannot hold"):
        grid_native.pack(detect_grids(_blocks(32, 16, 3e-3)(16, 64, g)), bits=4)
    widest = library.max_in_features()
    assert grid_native.accepts(widest) and not grid_native.accepts(widest + GROUP) and not grid_native.accepts(48)
    linear = _linear(_blocks(32, 16, 3e-3)(16, widest + GROUP, g))
    assert GridInt4Linear(linear).kernel == "int4"


def test_without_the_library_the_form_keeps_torchs_int4_kernel(tmp_path):
    """A process whose cache holds no library for this source (a fresh cache directory): the
    grouped linear runs torch's int4 kernel, and the reason is logged once."""
    script = (
        "import logging, torch\n"
        "logging.basicConfig(level=logging.INFO, format='%(name)s %(message)s')\n"
        "from torch import nn\n"
        "from pipeserve.layers.grid_int4 import GridInt4Linear\n"
        "layers = [GridInt4Linear(nn.Linear(64, 16)) for _ in range(3)]\n"
        "print('kernels', sorted({m.kernel for m in layers}))\n"
        "print('shape', tuple(layers[0](torch.randn(3, 64)).shape))\n")
    env = {**os.environ, "PIPESERVE_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "kernels ['int4']" in done.stdout and "shape (3, 16)" in done.stdout
    logged = [line for line in done.stderr.splitlines() if "native grid kernels not used" in line]
    assert len(logged) == 1 and "not built" in logged[0], done.stderr


def test_cache_key_follows_source_torch_and_cpu(tmp_path, monkeypatch):
    """The library's name changes with its source, torch's version and the CPU's flags, and a
    cached build is reused without calling the compiler."""
    key = build.cache_key()
    assert build.library_path().name == f"pipeserve_kernels-{key[:32]}.so"
    for kind in ("SOURCES", "HEADERS"):
        first = getattr(build, kind)[0]
        changed = tmp_path / first.name
        changed.write_bytes(first.read_bytes() + b"\n// changed\n")
        with monkeypatch.context() as patch:
            patch.setattr(build, kind, [changed, *getattr(build, kind)[1:]])
            assert build.cache_key() != key, kind
    with monkeypatch.context() as patch:
        patch.setattr(torch, "__version__", torch.__version__ + ".other")
        assert build.cache_key() != key
    with monkeypatch.context() as patch:
        patch.setattr(build, "cpu_flags", lambda: "fpu sse2")
        assert build.cache_key() != key
    assert build.cache_key() == key  # and nothing else in the process moves it

    def no_compiler(*args, **kwargs):
        raise AssertionError("a cached library must not be rebuilt")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert build.build() == build.library_path()  # built by the fixture: reused


def test_a_failed_build_says_why(tmp_path, monkeypatch):
    """A compiler error becomes BuildFailed with the compiler's message; nothing is left behind."""
    monkeypatch.setenv("PIPESERVE_CACHE_DIR", str(tmp_path))
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(build, "SOURCES", [broken])
    with pytest.raises(build.BuildFailed, match="error"):
        build.build()
    assert not list((tmp_path / "kernels").iterdir())


LANE_KEEPS_ITS_THREADS = r"""
import torch
from pipeserve.layers import grid_native
from pipeserve.layers.grid_detect import detect_grids
from pipeserve.scheduling import compute

assert grid_native.available()  # loads the library
torch.manual_seed(0)
grids = grid_native.pack(detect_grids(torch.randint(-8, 8, (512, 640)).float() * 1e-3))
x = torch.randn(1, 640)

def step():
    before = torch.get_num_threads()
    grid_native.linear(x, grids, portable={portable})
    return before, torch.get_num_threads()

lane = compute.ComputeLane(threads=2)  # its thread keeps 2 intra-op threads; later threads default to 1
print(lane.call(step))
"""


@pytest.mark.parametrize("portable", [False, True])
def test_the_kernel_keeps_the_compute_lanes_thread_count(portable):
    """The compute lane gives its thread 2 intra-op threads and every later thread 1
    (scheduling/compute.py). at::parallel_for, inlined into the library, ran torch's lazy
    per-thread init from the library's own copy of its flag at the kernel's first call on a
    thread, which set that thread back to torch's global default of 1: every operator after it
    on the lane (the head, attention) then ran on one core (a decoding step 26 -> 38 ms)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", LANE_KEEPS_ITS_THREADS.replace("{portable}", str(portable))],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "(2, 2)"
