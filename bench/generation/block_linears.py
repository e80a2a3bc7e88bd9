"""Gemma 3 270M's 72 fused block linears (qkv 1536x640, o 640x1024, gate_up 4096x640, down
640x2048, x18 layers) per decoding step, in each weight form, at 1 and 16 rows: float32
(oneDNN-packed, the float path), row int8 (layers/row_int8.py, load_in_8bit) and grouped int4
planes (layers/grid_int4.py) with the plane counts of the Q4_K_M file (qkv and gate_up Q5_0:
two planes; o Q4_K: one; down half Q4_K, half Q6_K: one / two). The forms run interleaved
(A B C A B C ...) on the same inputs; best-of wall ms and CPU ms per step.

    PYTHONPATH=service .venv/bin/python bench/generation/block_linears.py [--threads 2] [--rounds 7]
"""
from __future__ import annotations

import argparse
import json
import resource
import time

from pipeserve.serving.openmp_defaults import apply_openmp_defaults

apply_openmp_defaults()  # before torch loads, as the server does

import torch  # noqa: E402
from torch import nn  # noqa: E402

SHAPES = [(1536, 640), (640, 1024), (4096, 640), (640, 2048)]  # qkv, o, gate_up, down (N, K)
GROUP = 32


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _on_grid(n: int, k: int, levels: int, generator: torch.Generator) -> torch.Tensor:
    """Weights d * (q - levels / 2) per group of 32 (Q5_0 for 32 levels, a 16-level grid as Q4_K's)."""
    d = (torch.rand(n, k // GROUP, 1, generator=generator) * 2e-3 + 1e-4).half().float()
    q = torch.randint(0, levels, (n, k // GROUP, GROUP), generator=generator).float()
    return (d * (q - levels // 2)).reshape(n, k)


def weights(layers: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = []
    for layer in range(layers):
        qkv, o, gate_up, down = SHAPES
        out.append(_on_grid(*qkv, 32, g))
        out.append(_on_grid(*o, 16, g))
        out.append(_on_grid(*gate_up, 32, g))
        # Q4_K_M keeps half the down projections in Q6_K: no common grid (two planes, nearest 8-bit)
        out.append(_on_grid(*down, 16, g) if layer % 2 else torch.randn(*down, generator=g) * 0.02)
    return out


def forms(ws: list[torch.Tensor]) -> dict[str, list[nn.Module]]:
    from pipeserve.layers import grid_native
    from pipeserve.layers.grid_int4 import GridInt4Linear
    from pipeserve.layers.packed_linear import PackedLinear
    from pipeserve.layers.row_int8 import RowInt8Linear

    def linear(w):
        m = nn.Linear(w.shape[1], w.shape[0], bias=False)
        m.weight = nn.Parameter(w, requires_grad=False)
        return m

    out = {"float32_packed": [PackedLinear(w, None) for w in ws],
           "row_int8": [RowInt8Linear(linear(w)) for w in ws],
           "grouped_int4": [GridInt4Linear(linear(w), kernel="int4") for w in ws]}
    if grid_native.available():
        out["grouped_native"] = [GridInt4Linear(linear(w), kernel="native") for w in ws]
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", default="1,4,16,37", help="comma-separated row counts")
    parser.add_argument("--forms", default="", help="comma-separated subset of the forms (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ws = weights(18)
    modules = forms(ws)
    if args.forms:
        modules = {name: modules[name] for name in args.forms.split(",")}
    results = {"threads": args.threads}
    with torch.inference_mode():
        for rows in map(int, args.rows.split(",")):
            xs = [torch.randn(rows, w.shape[1]) for w in ws]
            wall = {name: [] for name in modules}
            cpu = {name: [] for name in modules}
            for name, layer in modules.items():  # warm-up
                for m, x in zip(layer, xs):
                    m(x)
            for _ in range(args.rounds):
                for name, layer in modules.items():
                    c, t = _cpu(), time.perf_counter()
                    for _ in range(args.steps):
                        for m, x in zip(layer, xs):
                            m(x)
                    wall[name].append((time.perf_counter() - t) / args.steps * 1000)
                    cpu[name].append((_cpu() - c) / args.steps * 1000)
            results[f"rows_{rows}"] = {name: {"best_ms": round(min(wall[name]), 2),
                                              "median_ms": round(sorted(wall[name])[len(wall[name]) // 2], 2),
                                              "cpu_ms": round(min(cpu[name]), 2)} for name in modules}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
