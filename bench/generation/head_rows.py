"""A 262144 x 640 tied head (Gemma 3 270M's) read by greedy rows, 1 to 16 rows per call: the
int8 screen (layers/int8_head.py), the bfloat16 screen (layers/verified_head.py) and the packed
float32 projection, best of 5 calls each, wall and CPU ms.

    PYTHONPATH=service python bench/generation/head_rows.py --threads 1
"""
from __future__ import annotations

import argparse
import time

import torch

from pipeserve.layers.int8_head import Int8ScreenedHead
from pipeserve.layers.verified_head import VerifiedHead

VOCAB, DIM = 262144, 640


def _best(fn, repeats: int = 5) -> str:
    fn()
    wall = cpu = float("inf")
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - w), min(cpu, time.process_time() - c)
    return f"{wall * 1e3:.1f} ms ({cpu * 1e3:.1f} CPU ms)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weight = torch.randn(VOCAB, DIM) * 0.05
    int8, bf16 = Int8ScreenedHead(weight), VerifiedHead(weight)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight)

    def exact(h):
        return torch.ops.mkldnn._linear_pointwise(h, packed, None, "none", [], "")

    def no_mask(scores):
        pass

    for rows in (1, 2, 4, 8, 16):
        # peaked logits, as a trained model's: each row close to one token's embedding
        h = weight[torch.randint(0, VOCAB, (rows,))] * 40 + torch.randn(rows, DIM) * 0.2
        print(f"{rows:2d} rows: int8 screen {_best(lambda: int8.scores(h, no_mask, exact))}, "
              f"bfloat16 screen {_best(lambda: bf16.scores(h, no_mask, exact))}, "
              f"float32 {_best(lambda: exact(h))}", flush=True)


if __name__ == "__main__":
    main()
