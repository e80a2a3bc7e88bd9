"""Gemma 3 270M (the real GGUF): one decoding step's work at 1 and 16 rows, as CPU seconds of the
calling thread, for comparing two trees on a busy machine. On one intra-op thread every
operator of the step runs on the calling thread, so its thread CPU time is the step's work;
other processes change it far less than wall time (the lead's loaded 2-core machine swung wall
times 2x). The step is the engine's (StepRunner.decode: layers, head, soft cap; choose_all), at
fixed positions (each step's cache commit is undone). Run once per tree, alternating:

    PYTHONPATH=<tree>/service:tests .venv/bin/python bench/generation/step_cpu.py --mode float32

Prints one JSON line: per batch, best and median wall ms per step and best thread CPU ms.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from pipeserve.serving.openmp_defaults import apply_openmp_defaults

apply_openmp_defaults()  # before torch loads, as the server does

import torch  # noqa: E402
from gemma_step import PROMPTS, load  # noqa: E402  (this script's folder, sys.path[0])


def measure(pipe, batch: int, rounds: int, steps: int) -> dict:
    from pipeserve.scheduling.generation_requests import RequestHandle

    engine = pipe.engine
    runner, cache = engine.runner, engine.cache
    params = pipe.parameters({"max_new_tokens": 64})
    seqs = []
    for prompt in PROMPTS[:batch]:
        ids = pipe.encode(prompt)
        seq = engine._new_sequence(RequestHandle(ids, params), 0, cache.allocate(), len(ids) + 64)
        runner.prefill([[seq]])
        seq.last = ids[-1]
        seqs.append(seq)

    def step():
        runner.choose_all(seqs, runner.decode(seqs))
        for seq in seqs:  # the same positions every step
            cache.lengths[seq.slot] -= 1

    for _ in range(3):
        step()
    walls, cpus = [], []
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), time.thread_time()
        for _ in range(steps):
            step()
        walls.append((time.perf_counter() - wall) / steps * 1000)
        cpus.append((time.thread_time() - cpu) / steps * 1000)
    for seq in seqs:
        cache.free(seq.slot)
    return {"wall_ms_best": round(min(walls), 2), "wall_ms_median": round(sorted(walls)[len(walls) // 2], 2),
            "thread_cpu_ms_best": round(min(cpus), 2)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("float32", "int8", "grouped"), default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    pipe = load(args.mode)
    import pipeserve

    out = {"tree": os.path.dirname(os.path.dirname(os.path.dirname(pipeserve.__file__))), "mode": args.mode,
           "threads": args.threads}
    with torch.inference_mode():
        for batch in (1, 16):
            out[f"b{batch}"] = measure(pipe, batch, args.rounds, args.steps)
    out["load_avg"] = round(os.getloadavg()[0], 1)
    pipe.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
