"""Gemma 3 270M (the real GGUF) decoding in-process: where a decode step's time goes, and the
engine's speed without gRPC. For comparing two trees, run it once per tree with that tree's
service/ first on PYTHONPATH, alternating (A B A B), and compare best-of figures and CPU seconds.

    PYTHONPATH=service:tests .venv/bin/python bench/generation/gemma_step.py --mode float32 --profile
    PYTHONPATH=service:tests .venv/bin/python bench/generation/gemma_step.py --mode int8 --engine
    PYTHONPATH=service:tests .venv/bin/python bench/generation/gemma_step.py --mode grouped --engine

--profile: torch.profiler over decode steps at batch 1 and 16 (ops per step by name, and the
wall time of each part of the step: layers, head, choice). --engine: single-stream tokens/s and
TTFT for real_gemma.py's prompt (128 greedy tokens), and 16 concurrent requests' aggregate
tokens/s through the engine, with CPU seconds per token. Prints one JSON line of results.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import resource
import sys
import time
from collections import Counter
from pathlib import Path

from pipeserve.serving.openmp_defaults import apply_openmp_defaults

apply_openmp_defaults()  # before torch loads, as the server does

import torch  # noqa: E402
from streams import engine_crowd, engine_once  # noqa: E402  (this script's folder, sys.path[0])

HERE = Path(__file__).resolve().parent


def _bench_prompts() -> list[str]:
    """real_gemma.py's PROMPTS, read without importing it: it puts its own tree's service/ first
    on sys.path, and this script must run whichever tree PYTHONPATH names."""
    tree = ast.parse((HERE / "real_gemma.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "PROMPTS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit("real_gemma.py has no PROMPTS")


PROMPTS = _bench_prompts()

GGUF = Path(os.environ.get("PIPESERVE_CACHE_DIR", Path.home() / ".cache" / "pipeserve")) / "embedded" / \
    "gemma-3-270m" / "gemma-3-270m-q4_k_m.gguf"


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_memory() -> dict:
    """The process's resident set now and its peak (VmRSS, VmHWM), bytes."""
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith("Vm"))
    return {key: int(status[name].split()[0]) * 1024 for key, name in (("rss", "VmRSS"), ("peak", "VmHWM"))}


def load(mode: str):
    from harness import load_pipeline

    if mode == "grouped":  # the file's own grids in int4 planes (layers/grid_int4.py)
        return load_pipeline(GGUF, quantization="grouped")
    return load_pipeline(GGUF, load_in_8bit=(mode == "int8"))


def engine_bench(pipe, args) -> dict:
    ids = pipe.encode(PROMPTS[0])
    crowd = [pipe.encode(p) for p in PROMPTS[:args.streams]]
    engine_once(pipe, ids, 4)
    engine_crowd(pipe, crowd, 4)
    single, ttft, aggregate = [], [], []
    single_cpu, crowd_cpu = [], []
    tokens = crowd_tokens = None
    for _ in range(args.repeats):
        ttft.append(min(engine_once(pipe, ids, 1)[0] for _ in range(3)) * 1000)
        c = cpu_s()
        _, total, tokens = engine_once(pipe, ids, args.new_tokens)
        single_cpu.append((cpu_s() - c) / args.new_tokens * 1000)
        single.append(args.new_tokens / total)
        c = cpu_s()
        total, crowd_tokens = engine_crowd(pipe, crowd, args.new_tokens)
        crowd_cpu.append((cpu_s() - c) / (args.new_tokens * len(crowd)) * 1000)
        aggregate.append(args.new_tokens * len(crowd) / total)
    return {"tok_s": max(single), "ttft_ms": min(ttft), "crowd_tok_s": max(aggregate),
            "cpu_ms_per_token": min(single_cpu), "crowd_cpu_ms_per_token": min(crowd_cpu),
            "every_tok_s": [round(x, 1) for x in single], "every_crowd": [round(x, 1) for x in aggregate],
            "tokens": tokens, "crowd_first_tokens": [t[:8] for t in crowd_tokens],
            "prompt_tokens": len(ids)}


def profile_steps(pipe, batch: int, steps: int) -> dict:
    """Decode steps through the engine's StepRunner on a batch of prompts already in the cache."""
    from torch.profiler import ProfilerActivity, profile, record_function

    engine = pipe.engine
    runner = engine.runner
    timings: Counter = Counter()
    step = runner._step  # a decoding step, whichever way its tokens are chosen

    def timed_step(seqs, read):
        with record_function("step.decode"):
            return step(seqs, read)
    runner._step = timed_step
    advance = engine._advance

    def timed_advance(seq, logits):
        with record_function("step.choose+emit"):
            return advance(seq, logits)
    engine._advance = timed_advance
    hidden = runner.model.hidden

    def timed_hidden(*a, **k):
        with record_function("step.layers"):
            return hidden(*a, **k)
    runner.model.hidden = timed_hidden
    params = pipe.parameters({"max_new_tokens": steps, "min_new_tokens": steps})
    prompts = [pipe.encode(p) for p in PROMPTS[:batch]]
    ops: Counter = Counter()
    # The engine's iterations run here, on the profiled thread (the profiler records this thread).
    from pipeserve.scheduling.generation_requests import RequestHandle
    for p in prompts:
        engine.scheduler.enqueue(RequestHandle(p, params))
    with torch.inference_mode():
        while engine.scheduler.waiting or not all(s.decoding for s in engine.scheduler.active):
            engine._iteration()  # admission and the prompt passes, outside the profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            while engine.scheduler.active or engine.scheduler.waiting:
                engine._iteration()
    decode_steps = engine.steps
    runner._step, engine._advance = step, advance
    del runner.model.hidden
    events = prof.key_averages()
    for e in events:
        ops[e.key] = e.count
        timings[e.key] = e.cpu_time_total / 1000
    # torch calls made from Python in the layers (direct children of step.layers): the
    # dispatches the model's code pays for, nested aten ops (inside rms_norm, say) not counted
    direct = 0
    try:
        direct = sum(1 for e in prof.events() if e.cpu_parent is not None and e.cpu_parent.name == "step.layers")
    except Exception:  # an older profiler without parents: leave it out
        pass
    parts = {k: round(timings[k], 1) for k in ("step.decode", "step.layers", "step.choose+emit")}
    n_decode = ops["step.decode"]
    top = sorted(((k, c) for k, c in ops.items() if k.startswith("aten::")), key=lambda kv: -kv[1])[:25]
    return {"batch": batch, "decode_steps": n_decode, "engine_steps": decode_steps,
            "ms_per_decode_step": round(parts["step.decode"] / max(1, n_decode), 2),
            "ms_layers_per_step": round(parts["step.layers"] / max(1, ops["step.layers"]), 2),
            "ms_choose_emit_per_step": round(parts["step.choose+emit"] / max(1, n_decode), 2),
            "torch_calls_in_layers_per_step": round(direct / max(1, ops["step.layers"])),
            "aten_ops_per_step": round(sum(c for k, c in ops.items() if k.startswith("aten::")) / max(1, n_decode)),
            "top_ops_per_step": {k: round(c / max(1, n_decode), 1) for k, c in top},
            "self_cpu_top": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("float32", "int8", "grouped"), default="float32")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--engine", action="store_true")
    parser.add_argument("--profile-steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    from pipeserve.scheduling import compute

    torch.set_flush_denormal(True)
    if args.profile:
        torch.set_num_threads(args.threads)  # the profiled steps run on this thread
    else:
        compute.install(args.threads)  # as the server does: the engine computes on the lane
    started = time.perf_counter()
    pipe = load(args.mode)
    import pipeserve

    out = {"label": args.label, "tree": str(Path(pipeserve.__file__).parents[2]), "mode": args.mode, "load_s": round(time.perf_counter() - started, 1),
           "load_avg": os.getloadavg()[0], "memory_bytes": pipe.memory_usage(), "process": process_memory()}
    if args.profile:
        for batch in (1, 16):
            report = profile_steps(pipe, batch, args.profile_steps)
            print(report.pop("self_cpu_top"), file=sys.stderr)
            out[f"profile_b{batch}"] = report
    if args.engine:
        out["engine"] = engine_bench(pipe, args)
    pipe.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
