"""Text generation, side by side with transformers' generate, on one GPT-2-small-shaped model
(random weights, 124M parameters) in one run, mode against the same mode:

- single stream, float32: greedy decoding of exactly --new-tokens tokens after a
  --prompt-tokens prompt (min_new_tokens = max_new_tokens, so both sides do the same work):
  tokens/s and time to first token (TTFT: prompt pass + first token). The greedy tokens of both
  sides are asserted equal;
- batch of --streams, float32: transformers' generate on all --streams prompts at once (left
  padding, attention mask, the same lengths, greedy) against pipeserve's engine and gRPC server
  with --streams concurrent requests for the same prompts (continuous batching); aggregate
  tokens/s. Both ratios are reported: against transformers batched (like with like) and
  against transformers' single stream;
- int8, single stream: pipeserve's load_in_8bit against transformers' model under torch's
  dynamic quantization (torch.ao.quantization.quantize_dynamic). Both sides quantize the same
  layers the same way: every linear layer of the blocks (GPT-2's Conv1D, converted to the
  equivalent nn.Linear on the reference side so that quantize_dynamic sees it) and the output
  projection, weights int8 per output channel (symmetric), activations quantized per call
  (fbgemm's dynamic int8 linear, 7-bit activation range); embeddings and LayerNorms stay
  float32;
- the physical limit at batch 1: measured memory bandwidth / bytes of weights read per token.

All timed runs are interleaved round by round (every runner once per round, in turn) and each
reports its best round. Both sides run in this process with the server's OpenMP settings and
the same torch thread count.

    PYTHONPATH=service:tests python bench/generation/run.py --new-tokens 64 --streams 16 --repeats 3 --threads 2

Results: results.json and results.md in --out (default bench/generation/results).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "service"), str(ROOT / "tests"), str(ROOT / "bench")]

from pipeserve.serving.openmp_defaults import apply_openmp_defaults  # noqa: E402

apply_openmp_defaults()  # the server's OpenMP settings, before torch loads (both sides share them)

import torch  # noqa: E402

from bench_env import environment, environment_markdown, print_environment  # noqa: E402
from streams import engine_crowd, engine_once, first_difference, grpc_crowd  # noqa: E402

# GPT-2 small: 12 layers, 768 wide, 12 heads, 50257-token vocabulary, 1024 positions.
GPT2_SMALL = dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257)
TEXT = ("The quick brown fox jumps over the lazy dog. A server batches concurrent requests so that "
        "each decoding step reads the weights once for every sequence. ") * 8


def build_checkpoint(directory: Path) -> Path:
    import transformers
    from generation_checkpoints import byte_level_tokenizer

    torch.manual_seed(0)
    tokenizer = byte_level_tokenizer()
    config = transformers.GPT2Config(**GPT2_SMALL, bos_token_id=tokenizer.eos_token_id,
                                     eos_token_id=tokenizer.eos_token_id)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_prompts(pipe, count: int, prompt_tokens: int) -> list[list[int]]:
    """`count` different prompts; the first is exactly `prompt_tokens` long (the single-stream
    prompt), the others 0-12 tokens shorter (so the batch needs padding), each starting at a
    different place in the text. Every prompt's text round-trips to the same ids (the gRPC
    clients send text)."""
    ids = pipe.encode(TEXT)
    prompts = []
    for i in range(count):
        length = prompt_tokens - 4 * (i % 4)
        prompt = ids[3 * i: 3 * i + length]
        while pipe.encode(pipe.tokenizer.decode(prompt)) != prompt:  # a cut inside a multi-byte piece
            prompt = prompt[1:]
        prompts.append(prompt)
    return prompts


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


def linear_from_conv1d(conv) -> torch.nn.Linear:
    """transformers' GPT-2 Conv1D (weight [in, out], y = x @ W + b) as the same nn.Linear."""
    linear = torch.nn.Linear(conv.weight.shape[0], conv.weight.shape[1])
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    return linear


def dynamic_int8(model):
    """transformers' model under torch's dynamic int8 quantization, the same layers ours
    quantizes: Conv1D -> nn.Linear (exact), then quantize_dynamic on every nn.Linear (the
    blocks' and the tied output projection's, which gets its own int8 copy; the embedding
    stays float32) with per-channel symmetric int8 weights."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    from transformers.pytorch_utils import Conv1D

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                setattr(module, name, linear_from_conv1d(child))
    return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


class Reference:
    """transformers' GPT2LMHeadModel.generate on the same checkpoint (greedy)."""

    def __init__(self, directory: Path, device: str, int8: bool = False):
        import transformers

        self.device = device
        model = transformers.GPT2LMHeadModel.from_pretrained(directory, dtype=torch.float32).eval()
        self.model = (dynamic_int8(model) if int8 else model).to(device)
        self.pad = self.model.config.eos_token_id

    def generate(self, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                       min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                                       pad_token_id=self.pad)

    def once(self, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        ids = torch.tensor([prompt], device=self.device)
        mask = torch.ones_like(ids)
        _sync(self.device)
        start = time.perf_counter()
        self.generate(ids, mask, 1)
        _sync(self.device)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        out = self.generate(ids, mask, new_tokens)
        _sync(self.device)
        total = time.perf_counter() - start
        assert out.shape[1] == len(prompt) + new_tokens
        return ttft, total, out[0, len(prompt):].tolist()

    def batch(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
        """All prompts in one generate call, left-padded (transformers' recipe for decoder-only
        batches: the attention mask hides the padding, positions come from the mask)."""
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        _sync(self.device)
        start = time.perf_counter()
        out = self.generate(ids, mask, new_tokens)
        _sync(self.device)
        total = time.perf_counter() - start
        assert out.shape[1] == width + new_tokens
        return total, out[:, width:].tolist()


class Ours:
    """pipeserve's engine (the path the servicer uses), one request at a time."""

    def __init__(self, pipe):
        self.pipe = pipe

    def once(self, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        first, total, tokens = engine_once(self.pipe, prompt, new_tokens)
        assert len(tokens) == new_tokens
        return first, total, tokens

    def batch(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
        """All prompts submitted at once: the engine's continuous batching decodes them together."""
        total, tokens = engine_crowd(self.pipe, prompts, new_tokens)
        assert all(len(t) == new_tokens for t in tokens)
        return total, tokens


def interleaved(runners: dict, prompt: list[int], new_tokens: int, repeats: int) -> tuple[dict, dict]:
    """Best of `repeats` for each single-stream runner, alternating runners so that load on a
    shared machine hits all of them alike; one warm-up each first. Returns the timings and each
    runner's tokens."""
    for runner in runners.values():
        runner.once(prompt, 4)
    best = {name: [float("inf"), float("inf")] for name in runners}
    every = {name: [] for name in runners}
    tokens = {}
    for _ in range(repeats):
        for name, runner in runners.items():
            ttft, total, tokens[name] = runner.once(prompt, new_tokens)
            best[name] = [min(best[name][0], ttft), min(best[name][1], total)]
            every[name].append(round(new_tokens / total, 2))
    return {name: {"ttft_ms": ttft * 1000, "tokens_per_s": new_tokens / total, "every_round_tokens_per_s": every[name]}
            for name, (ttft, total) in best.items()}, tokens


def interleaved_batches(runners: dict, prompts: list[list[int]], new_tokens: int, repeats: int) -> tuple[dict, dict]:
    """The same for whole batches: aggregate tokens/s (all sequences' new tokens / wall time)."""
    for runner in runners.values():
        runner.batch(prompts, 4)
    best = {name: float("inf") for name in runners}
    every = {name: [] for name in runners}
    tokens = {}
    produced = len(prompts) * new_tokens
    for _ in range(repeats):
        for name, runner in runners.items():
            total, tokens[name] = runner.batch(prompts, new_tokens)
            best[name] = min(best[name], total)
            every[name].append(round(produced / total, 1))
    return {name: {"streams": len(prompts), "aggregate_tokens_per_s": produced / total,
                   "every_round_tokens_per_s": every[name]} for name, total in best.items()}, tokens


def ours_concurrent_grpc(directory: Path, prompt_texts: list[str], new_tokens: int, repeats: int,
                         device: str) -> tuple[dict, list[list[int]]]:
    """The server in this process (the model loaded through ModelService.LoadModel), the clients
    in another (as in a deployment); best of `repeats` crowds."""
    import multiprocessing

    from grpc_testing import load_model, make_server

    server = make_server()
    try:
        load_model(server, directory, device=device)
        best, every, tokens = float("inf"), [], None
        produced = len(prompt_texts) * new_tokens
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            pool.apply(grpc_crowd, (server.address, str(directory), prompt_texts[:2], 4))  # warm-up
            for _ in range(repeats):
                wall, results = pool.apply(grpc_crowd, (server.address, str(directory), prompt_texts, new_tokens))
                assert all(len(stream["ids"]) == new_tokens for stream in results)
                every.append(round(produced / wall, 1))
                if wall < best:
                    best, tokens = wall, [stream["ids"] for stream in results]
                    mean_ttft = sum(stream["ttft_s"] for stream in results) / len(results)
        pipe = server.manager.get(str(directory)).pipeline
        return {"streams": len(prompt_texts), "aggregate_tokens_per_s": produced / best,
                "every_round_tokens_per_s": every, "mean_ttft_ms": 1000 * mean_ttft,
                "max_batch": max(pipe.engine.batch_sizes)}, tokens
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; each runner reports its best")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # Random weights drive GELU inputs into denormal floats, which are 10-100x slower on x86
    # CPUs (transformers' tanh-formula GELU suffers most); real checkpoints do not do this.
    torch.set_flush_denormal(True)
    env = environment()
    print_environment(env)

    from harness import load_pipeline

    directory = build_checkpoint(Path(tempfile.mkdtemp(prefix="bench-gpt2-")))
    float32 = load_pipeline(directory, device=args.device)
    prompts = make_prompts(float32, args.streams, args.prompt_tokens)
    prompt = prompts[0]
    prompt_texts = [float32.tokenizer.decode(p) for p in prompts]

    dense = load_pipeline(directory, device=args.device, packed_linear=False)
    parameters = sum(p.numel() for p in dense.model.parameters())
    dense.close()
    results: dict = {
        "model": "GPT-2 small shape, random weights", "parameters": parameters,
        "device": args.device, "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "environment": env,
        "prompt_tokens": len(prompt), "batch_prompt_tokens": [len(p) for p in prompts],
        "new_tokens": args.new_tokens, "repeats": args.repeats, "flush_denormal": True,
        "decoding": "greedy (num_beams=1, do_sample=False), exactly new_tokens tokens on both sides",
        "int8": "both sides: every block linear (GPT-2 Conv1D) and the output projection as int8 weights per "
                "output channel (symmetric), activations quantized per call (fbgemm dynamic int8 linear); "
                "embeddings and LayerNorms float32. pipeserve: load_in_8bit (quantization.Int8Linear, "
                "scale max|w|/127); transformers: Conv1D -> nn.Linear, then torch.ao.quantization."
                "quantize_dynamic(per_channel_dynamic_qconfig, qint8)",
    }
    results["verified_head"] = getattr(float32.model, "verified_head", None) is not None
    int8 = load_pipeline(directory, device=args.device, load_in_8bit=True)
    int8_bytes = int8.memory_bytes()
    reference = Reference(directory, args.device)
    singles, single_tokens = interleaved(
        {"reference_single": reference, "ours_single_float32": Ours(float32),
         "reference_single_int8": Reference(directory, args.device, int8=True), "ours_single_int8": Ours(int8)},
        prompt, args.new_tokens, args.repeats)
    results.update(singles)
    int8.close()
    # Greedy float32 tokens must be the same on both sides, or the timings compare different work.
    diff = first_difference(single_tokens["ours_single_float32"], single_tokens["reference_single"])
    assert diff is None, f"single stream: greedy tokens differ from transformers' at new token {diff}"
    agree = sum(a == b for a, b in zip(single_tokens["ours_single_int8"], single_tokens["reference_single_int8"]))
    results["int8_tokens_equal_to_reference_int8"] = f"{agree}/{args.new_tokens}"

    batches, batch_tokens = interleaved_batches({"reference_batch": reference, "ours_engine_batch": Ours(float32)},
                                                prompts, args.new_tokens, args.repeats)
    results.update(batches)
    float32.close()
    results["ours_grpc_concurrent"], grpc_tokens = ours_concurrent_grpc(directory, prompt_texts, args.new_tokens,
                                                                        args.repeats, args.device)
    # Each stream's greedy tokens against transformers' batched row for the same prompt and its
    # own single-stream decode: padding and batch shapes change float32 rounding, and random
    # weights give near-flat distributions where a rounding difference can flip a near-tie, so
    # the count is recorded (and rows that differ are named) rather than asserted.
    singles_ref = [reference.once(p, args.new_tokens)[2] for p in prompts]
    results["batch_rows_equal"] = {
        "transformers_batched_vs_transformers_single": sum(a == b for a, b in zip(batch_tokens["reference_batch"], singles_ref)),
        "ours_engine_vs_transformers_single": sum(a == b for a, b in zip(batch_tokens["ours_engine_batch"], singles_ref)),
        "ours_grpc_vs_transformers_single": sum(a == b for a, b in zip(grpc_tokens, singles_ref)),
        "ours_grpc_vs_transformers_batched": sum(a == b for a, b in zip(grpc_tokens, batch_tokens["reference_batch"])),
        "of": len(prompts),
    }
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
    ref, f32 = r["reference_single"], r["ours_single_float32"]
    ref8, i8 = r["reference_single_int8"], r["ours_single_int8"]
    refb, engb, grpc_ = r["reference_batch"], r["ours_engine_batch"], r["ours_grpc_concurrent"]
    n = grpc_["streams"]
    eq = r["batch_rows_equal"]
    lines = [
        f"# Text generation: pipeserve vs transformers generate ({r['device']}"
        + (f", {r['gpu']}" if r.get("gpu") else f", {r['threads']} threads, both sides") + ")",
        "",
        environment_markdown(r["environment"]),
        "",
        f"{r['model']}, {r['parameters'] / 1e6:.0f}M parameters; {r['decoding']}: {r['new_tokens']} new tokens; "
        f"single-stream prompt {r['prompt_tokens']} tokens, batch prompts {min(r['batch_prompt_tokens'])}-"
        f"{max(r['batch_prompt_tokens'])} tokens. Best of {r['repeats']} interleaved rounds (every round in the "
        "JSON). Denormals flushed to zero on both sides (random weights produce them).",
        "",
        "| mode | transformers generate | pipeserve | pipeserve / transformers |",
        "| --- | ---: | ---: | ---: |",
        f"| 1 stream, float32, greedy: tokens/s | {ref['tokens_per_s']:.1f} | {f32['tokens_per_s']:.1f} | "
        f"{f32['tokens_per_s'] / ref['tokens_per_s']:.2f}x |",
        f"| 1 stream, float32: TTFT ms (ratio: transformers' TTFT / pipeserve's) | {ref['ttft_ms']:.1f} | "
        f"{f32['ttft_ms']:.1f} | {ref['ttft_ms'] / f32['ttft_ms']:.2f}x |",
        f"| 1 stream, int8 dynamic (both sides), greedy: tokens/s | {ref8['tokens_per_s']:.1f} | "
        f"{i8['tokens_per_s']:.1f} | {i8['tokens_per_s'] / ref8['tokens_per_s']:.2f}x |",
        f"| {n} sequences, float32, greedy, aggregate tokens/s: transformers batch {n} (left padding) vs "
        f"pipeserve engine, {n} concurrent requests | {refb['aggregate_tokens_per_s']:.1f} | "
        f"{engb['aggregate_tokens_per_s']:.1f} | {engb['aggregate_tokens_per_s'] / refb['aggregate_tokens_per_s']:.2f}x |",
        f"| the same, pipeserve through gRPC ({n} GenerateStream calls from a client process; mean TTFT "
        f"{grpc_['mean_ttft_ms']:.0f} ms, largest decode batch {grpc_['max_batch']}) | "
        f"{refb['aggregate_tokens_per_s']:.1f} | {grpc_['aggregate_tokens_per_s']:.1f} | "
        f"{grpc_['aggregate_tokens_per_s'] / refb['aggregate_tokens_per_s']:.2f}x |",
        f"| pipeserve gRPC, {n} streams, against transformers' single stream (not like with like: batching "
        f"on one side only) | {ref['tokens_per_s']:.1f} | {grpc_['aggregate_tokens_per_s']:.1f} | "
        f"{grpc_['aggregate_tokens_per_s'] / ref['tokens_per_s']:.2f}x |",
        "",
        "- Greedy tokens, single stream float32: identical on both sides (asserted). int8: "
        f"{r['int8_tokens_equal_to_reference_int8']} tokens equal to the transformers int8 reference (not "
        "asserted: the two quantizers' scales differ slightly, max|w|/127 vs max|w|/127.5, and random "
        "weights give near-flat distributions where that can flip a near-tie).",
        f"- Batch rows with exactly the tokens of transformers' own single-stream decode of the same prompt: "
        f"transformers batched {eq['transformers_batched_vs_transformers_single']}/{eq['of']}, pipeserve engine "
        f"{eq['ours_engine_vs_transformers_single']}/{eq['of']}, pipeserve gRPC {eq['ours_grpc_vs_transformers_single']}"
        f"/{eq['of']} (pipeserve gRPC = transformers batched on {eq['ours_grpc_vs_transformers_batched']}/{eq['of']}).",
        f"- int8, what each side quantizes: {r['int8']}.",
        f"- int8 / float32, pipeserve: {i8['tokens_per_s'] / f32['tokens_per_s']:.2f}x; transformers: "
        f"{ref8['tokens_per_s'] / ref['tokens_per_s']:.2f}x.",
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
