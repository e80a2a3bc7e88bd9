"""Text generation, side by side with transformers' generate, on one GPT-2-small-shaped model
(random weights, 124M parameters) in one run:

- single stream: greedy decoding of exactly --new-tokens tokens after a --prompt-tokens prompt
  (min_new_tokens = max_new_tokens, so both sides do the same work): tokens/s and time to
  first token (TTFT: prompt pass + first token);
- aggregate tokens/s of --streams concurrent GenerateStream calls through a real gRPC server
  (continuous batching), against the reference's single stream;
- int8 weight-only (load_in_8bit) against float32, single stream;
- the physical limit at batch 1: measured memory bandwidth / bytes of weights read per token.

    PYTHONPATH=service:tests python bench/generation/run.py --new-tokens 64 --streams 16

Results: results.json and results.md in --out (default bench/generation/results).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "service"), str(ROOT / "tests")]

from pipeserve.serving.openmp_defaults import apply_openmp_defaults  # noqa: E402

apply_openmp_defaults()  # the server's OpenMP settings, before torch loads (both sides share them)

import torch  # noqa: E402

# GPT-2 small: 12 layers, 768 wide, 12 heads, 50257-token vocabulary, 1024 positions.
GPT2_SMALL = dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257)


def build_checkpoint(directory: Path, device: str) -> Path:
    import transformers
    from generation_checkpoints import byte_level_tokenizer

    torch.manual_seed(0)
    tokenizer = byte_level_tokenizer()
    config = transformers.GPT2Config(**GPT2_SMALL, bos_token_id=tokenizer.eos_token_id,
                                     eos_token_id=tokenizer.eos_token_id)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def memory_bandwidth(device: str, megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s of reading a large buffer (a sum reads every byte once), best of `repeats`."""
    x = torch.ones(megabytes * (1 << 20) // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Reference:
    """transformers' GPT2LMHeadModel.generate on the same checkpoint."""

    def __init__(self, directory: Path, device: str):
        import transformers

        self.device = device
        self.model = transformers.GPT2LMHeadModel.from_pretrained(directory, dtype=torch.float32).to(device).eval()

    def once(self, prompt: list[int], new_tokens: int) -> tuple[float, float]:
        ids = torch.tensor([prompt], device=self.device)
        kwargs = dict(do_sample=False, pad_token_id=self.model.config.eos_token_id)
        with torch.inference_mode():
            _sync(self.device)
            start = time.perf_counter()
            self.model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
            _sync(self.device)
            ttft = time.perf_counter() - start
            start = time.perf_counter()
            out = self.model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
            _sync(self.device)
            total = time.perf_counter() - start
        assert out.shape[1] == len(prompt) + new_tokens
        return ttft, total


class Ours:
    """pipeserve's engine (the path the servicer uses), one request at a time."""

    def __init__(self, pipe):
        self.pipe = pipe

    def once(self, prompt: list[int], new_tokens: int) -> tuple[float, float]:
        from pipeserve.scheduling.generation_engine import TokenEvent

        params = self.pipe.parameters({"max_new_tokens": new_tokens, "min_new_tokens": new_tokens})
        start = time.perf_counter()
        first = None
        count = 0
        for event in self.pipe.engine.submit(prompt, params):
            if isinstance(event, TokenEvent):
                count += 1
                if first is None:
                    first = time.perf_counter() - start
        total = time.perf_counter() - start
        assert count == new_tokens
        return first, total


def ours_concurrent_engine(pipe, prompt: list[int], new_tokens: int, streams: int) -> dict:
    """The same crowd without gRPC: what continuous batching itself delivers."""
    import threading

    params = pipe.parameters({"max_new_tokens": new_tokens, "min_new_tokens": new_tokens})
    list(pipe.engine.submit(prompt, params))  # warm-up
    start = time.perf_counter()
    handles = [pipe.engine.submit(prompt, params) for _ in range(streams)]
    counts = [0] * streams

    def drain(i):
        counts[i] = sum(1 for _ in handles[i]) - 1  # minus the done event

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    assert sum(counts) == streams * new_tokens
    return {"streams": streams, "aggregate_tokens_per_s": sum(counts) / wall}


def interleaved(runners: dict, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    """Best of `repeats` for each runner, alternating runners so that load on a shared machine
    hits all of them alike; one warm-up each first."""
    for runner in runners.values():
        runner.once(prompt, 4)
    best = {name: [float("inf"), float("inf")] for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            ttft, total = runner.once(prompt, new_tokens)
            best[name] = [min(best[name][0], ttft), min(best[name][1], total)]
    return {name: {"ttft_ms": ttft * 1000, "tokens_per_s": new_tokens / total} for name, (ttft, total) in best.items()}


def grpc_crowd(address: str, model: str, prompt_text: str, new_tokens: int, streams: int) -> tuple[float, list]:
    """Runs in a separate client process: `streams` concurrent GenerateStream calls."""
    import grpc

    sys.path[:0] = [str(ROOT / "service")]
    from pipeserve.v1 import text_generation_pb2 as pb, text_generation_pb2_grpc

    options = pb.GenerationOptions(max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    async def one(stub):
        start = time.perf_counter()
        first = None
        count = 0
        async for message in stub.GenerateStream(pb.GenerateStreamRequest(
                model=model, prompt=prompt_text, options=options), timeout=3600):
            if message.WhichOneof("event") == "token":
                count += 1
                if first is None:
                    first = time.perf_counter() - start
        return count, first

    async def crowd():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = text_generation_pb2_grpc.TextGenerationServiceStub(channel)
            start = time.perf_counter()
            results = await asyncio.gather(*(one(stub) for _ in range(streams)))
            return time.perf_counter() - start, results

    return asyncio.run(crowd())


def ours_concurrent_grpc(directory: Path, prompt_text: str, new_tokens: int, streams: int, device: str) -> dict:
    """The server in this process, the clients in another (as in a deployment)."""
    import multiprocessing

    from grpc_testing import load_model, make_server

    server = make_server()
    try:
        load_model(server, directory, device=device)
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            pool.apply(grpc_crowd, (server.address, str(directory), prompt_text, 4, 2))  # warm-up
            wall, results = pool.apply(grpc_crowd, (server.address, str(directory), prompt_text, new_tokens, streams))
        tokens = sum(count for count, _ in results)
        assert tokens == streams * new_tokens
        pipe = server.manager.get(str(directory)).pipeline
        return {"streams": streams, "aggregate_tokens_per_s": tokens / wall,
                "mean_ttft_ms": 1000 * sum(f for _, f in results) / len(results),
                "max_batch": max(pipe.engine.batch_sizes)}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # Random weights drive GELU inputs into denormal floats, which are 10-100x slower on x86
    # CPUs (transformers' tanh-formula GELU suffers most); real checkpoints do not do this.
    torch.set_flush_denormal(True)

    from harness import load_pipeline

    directory = build_checkpoint(Path(tempfile.mkdtemp(prefix="bench-gpt2-")), args.device)
    float32 = load_pipeline(directory, device=args.device)
    # A fixed prompt of exactly --prompt-tokens tokens; its text round-trips to the same ids.
    text = "The quick brown fox jumps over the lazy dog. " * 8
    prompt = float32.encode(text)[: args.prompt_tokens]
    prompt_text = float32.tokenizer.decode(prompt)
    assert float32.encode(prompt_text) == prompt

    dense = load_pipeline(directory, device=args.device, packed_linear=False)
    parameters = sum(p.numel() for p in dense.model.parameters())
    dense.close()
    results: dict = {
        "model": "GPT-2 small shape, random weights", "parameters": parameters,
        "device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "prompt_tokens": len(prompt), "new_tokens": args.new_tokens, "repeats": args.repeats,
        "flush_denormal": True,
    }
    results["verified_head"] = getattr(float32.model, "verified_head", None) is not None
    int8 = load_pipeline(directory, device=args.device, load_in_8bit=True)
    int8_bytes = int8.memory_bytes()
    singles = interleaved({"reference_single": Reference(directory, args.device), "ours_single_float32": Ours(float32),
                           "ours_single_int8": Ours(int8)}, prompt, args.new_tokens, args.repeats)
    results.update(singles)
    results["ours_engine_concurrent"] = ours_concurrent_engine(float32, prompt, args.new_tokens, args.streams)
    float32.close()
    int8.close()
    results["ours_grpc_concurrent"] = ours_concurrent_grpc(directory, prompt_text, args.new_tokens, args.streams,
                                                           args.device)
    bandwidth = memory_bandwidth(args.device)
    # Bytes read per decoded token at batch 1: every weight once, the (tied) output projection
    # included; the float embedding itself is only gathered (one row): on CPU both float32
    # (layers/packed_linear.py) and int8 give the projection its own copy, so its bytes count once.
    embedding = GPT2_SMALL["vocab_size"] * GPT2_SMALL["n_embd"] * 4
    weight_bytes = parameters * 4
    if results["verified_head"]:  # greedy steps read the projection's bfloat16 screen (layers/verified_head.py)
        weight_bytes -= embedding // 2
    results["memory_bandwidth_gb_s"] = bandwidth / 1e9
    results["weight_bytes_float32"] = weight_bytes
    results["weight_bytes_int8_read_per_token"] = int8_bytes - embedding
    results["limit_tokens_per_s_float32"] = bandwidth / weight_bytes
    results["limit_tokens_per_s_int8"] = bandwidth / (int8_bytes - embedding)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))


def markdown(r: dict) -> str:
    ref, f32, i8, grpc_ = r["reference_single"], r["ours_single_float32"], r["ours_single_int8"], r["ours_grpc_concurrent"]
    lines = [
        f"# Text generation: pipeserve vs transformers generate ({r['device']}"
        + (f", {r['gpu']}" if r.get("gpu") else f", {r['threads']} threads") + ")",
        "",
        f"{r['model']}, {r['parameters'] / 1e6:.0f}M parameters; prompt {r['prompt_tokens']} tokens, exactly "
        f"{r['new_tokens']} new tokens, greedy; best of {r['repeats']} interleaved runs. torch {r['torch']}, "
        "denormals flushed to zero (random weights produce them).",
        "",
        "| run | tokens/s | TTFT ms |",
        "| --- | ---: | ---: |",
        f"| transformers generate, float32, 1 stream | {ref['tokens_per_s']:.1f} | {ref['ttft_ms']:.1f} |",
        f"| pipeserve engine, float32, 1 stream | {f32['tokens_per_s']:.1f} | {f32['ttft_ms']:.1f} |",
        f"| pipeserve engine, int8, 1 stream | {i8['tokens_per_s']:.1f} | {i8['ttft_ms']:.1f} |",
        f"| pipeserve gRPC, float32, {grpc_['streams']} concurrent streams from a client process (aggregate) | "
        f"{grpc_['aggregate_tokens_per_s']:.1f} | {grpc_['mean_ttft_ms']:.1f} (mean) |",
        f"| pipeserve engine without gRPC, float32, {r['ours_engine_concurrent']['streams']} concurrent requests "
        f"(aggregate) | {r['ours_engine_concurrent']['aggregate_tokens_per_s']:.1f} | |",
        "",
        f"- aggregate / reference single stream: {grpc_['aggregate_tokens_per_s'] / ref['tokens_per_s']:.2f}x "
        f"(largest decode batch {grpc_['max_batch']})",
        f"- single stream, ours / reference: {f32['tokens_per_s'] / ref['tokens_per_s']:.2f}x; "
        f"int8 / float32: {i8['tokens_per_s'] / f32['tokens_per_s']:.2f}x",
        f"- physical limit at batch 1 = memory bandwidth ({r['memory_bandwidth_gb_s']:.1f} GB/s, measured by summing "
        f"a 512 MiB buffer) / bytes of weights read per token: float32 {r['weight_bytes_float32'] / 1e6:.0f} MB"
        f"{' (output projection read as its bfloat16 screen)' if r.get('verified_head') else ''} -> "
        f"{r['limit_tokens_per_s_float32']:.1f} tokens/s (we reach "
        f"{100 * f32['tokens_per_s'] / r['limit_tokens_per_s_float32']:.0f}%); int8 "
        f"{r['weight_bytes_int8_read_per_token'] / 1e6:.0f} MB -> {r['limit_tokens_per_s_int8']:.1f} tokens/s (we reach "
        f"{100 * i8['tokens_per_s'] / r['limit_tokens_per_s_int8']:.0f}%)",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
