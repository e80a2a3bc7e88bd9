"""Text generation on real weights: Gemma 3 270M from one GGUF file (embedded/gemma-3-270m,
Q4_K_M), pipeserve through its gRPC server against llama.cpp (llama-cpp-python) and
transformers, in one run, on the same file, the same prompt and the same thread count.

Each side is its own process, so its resident memory is its own:
- pipeserve: one `python -m pipeserve.server` per mode (a config file preloads the model as the
  text-generation default with the mode's load options: float32 = the exact float path, int8 =
  load_in_8bit, and whatever `--mode NAME=OPTIONS` names), this process its gRPC client;
- llama.cpp: bench/generation/llama_cpp_side.py in the llama-cpp-python virtualenv
  (bench/generation/setup_llama_cpp builds it), create_completion(stream=True);
- transformers: bench/generation/transformers_side.py, AutoModelForCausalLM.from_pretrained(dir,
  gguf_file=...) in float32, generate with a streamer.

Every side decodes greedily exactly --new-tokens tokens (pipeserve and transformers:
min_new_tokens = max_new_tokens; llama.cpp: max_tokens, its end-of-generation tokens banned
only if greedy decoding reaches one) after the same text prompt, which each side tokenizes
itself (the BOS token included; the counts are reported). Measured: TTFT (call start to the
first token), tokens/s single stream (new tokens / whole call, and the decode rate after the
first token), pipeserve's aggregate tokens/s with --streams concurrent GenerateStream calls
(different prompts), and each process's resident memory (VmRSS after the runs, VmHWM = its
peak, load included).

Rounds are interleaved (every side once per round, then the crowds) and each figure is the
best of --repeats rounds; every round is in the JSON. Greedy tokens: pipeserve float32 must
equal transformers' (the run fails after writing its results if not); llama.cpp computes with
the quantized weights, so its first divergence from them is reported; other pipeserve modes
are compared with float32.

    bench/generation/setup_llama_cpp          # once: builds llama-cpp-python (~10 min on 2 cores)
    .venv/bin/python bench/generation/real_gemma.py [--mode int4='load_in_8bit = false, ...'] [--repeats 3]

Results: real_gemma.json and real_gemma.md in --out (default bench/generation/results).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT / "service"), str(ROOT / "clients" / "python"), str(ROOT / "bench")]

from pipeserve.serving.openmp_defaults import apply_openmp_defaults  # noqa: E402

# The server's OpenMP settings (bounded spinning of idle workers) into this process's
# environment, which the children inherit: the llama-cpp-python build uses libgomp too (its
# barriers are OpenMP barriers), and on a loaded 2-core machine libgomp's default spinning made
# it ~10x slower (32 tokens: 44-79 s with the defaults, 7.7-9.0 s with these, load average 12).
# --llama-openmp-defaults adds a llama.cpp side with libgomp's defaults as well.
apply_openmp_defaults()

from bench_env import environment, environment_markdown, print_environment  # noqa: E402
from bench_server import process_memory, start_server, wait_serving  # noqa: E402
from side_protocol import Side  # noqa: E402
from streams import first_difference, grpc_crowd  # noqa: E402

SERVICE = "pipeserve.v1.TextGenerationService"
EMBEDDED = "embedded/gemma-3-270m"
LLAMA = "llama.cpp"
LLAMA_GOMP = "llama.cpp [libgomp defaults]"
MiB = 1 << 20
# pipeserve modes: name -> the preload's load options (config.py's [preload] keys, TOML).
DEFAULT_MODES = ["float32=load_in_8bit = false", "int8=load_in_8bit = true"]
# Natural text, 38-44 tokens each with Gemma's tokenizer (BOS included); the first is the
# single-stream prompt, all of them the concurrent streams'.
PROMPTS = [
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk. From the lamp room he "
    "could see the fishing boats returning to the harbour, their lights scattered across the dark water like",
    "Bread has been baked for thousands of years. The earliest loaves were flat and dense, made from crushed "
    "grain and water cooked on hot stones. Over time, bakers discovered that",
    "When the train finally pulled into the station, the platform was almost empty. Maria picked up her "
    "suitcase, stepped down onto the wet concrete and looked around for her brother, who had promised",
    "Honeybees communicate the location of flowers through a series of movements known as the waggle dance. "
    "The angle of the dance relative to the sun tells the other bees",
    "The city council met on Tuesday night to discuss the new bicycle lanes. Several shop owners on the main "
    "street argued that removing parking spaces would hurt their business, while",
    "In the winter of 1848, a small expedition set out across the mountains to map the pass that traders had "
    "described. The guide, an experienced hunter, warned them that the snow",
    "A good cup of coffee starts long before the water boils. The beans are grown on steep hillsides, picked "
    "by hand when the cherries are ripe, and then dried in the sun until",
    "The museum's newest exhibit tells the story of early flight. Visitors walk past fragile gliders made of "
    "wood and canvas, photographs of daring pilots, and a replica of the engine that",
    "Every spring the river floods the low fields near the village. The farmers have learned to plant late, "
    "after the water recedes, and the rich silt it leaves behind makes the soil",
    "She opened the letter carefully, recognising her grandmother's handwriting at once. The paper was "
    "yellow with age, and the ink had faded in places, but the first line still read",
    "Modern telescopes can detect planets orbiting distant stars by measuring tiny dips in the light as a "
    "planet passes in front of its star. Astronomers have used this method to",
    "The recipe called for three ripe tomatoes, a handful of fresh basil, two cloves of garlic and a generous "
    "splash of olive oil. Tom chopped everything on the wooden board while",
    "Libraries have changed a great deal in the last twenty years. Besides lending books, many now offer "
    "computer classes, quiet rooms for study, and programmes for children that",
    "At the edge of the forest stood a small cabin with a red door. Nobody in the town knew who lived there, "
    "but every morning a thin line of smoke rose from the chimney and",
    "The marathon began at seven in the morning, when the air was still cool. Thousands of runners crowded "
    "the start line, stretching their legs and checking their watches, waiting for",
    "Learning a second language as an adult takes patience. Most people find that listening to native "
    "speakers every day, even for a few minutes, helps them understand faster than",
]


# ---- sides ---------------------------------------------------------------------------------------

def toml_value(value) -> str:
    """A value of a preload spec as TOML (strings in JSON quoting, which TOML's basic strings read)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise ValueError(f"cannot write {value!r} as TOML")


def parse_mode(text: str) -> tuple[str, dict]:
    """`NAME=KEY = VALUE, ...` -> (NAME, {KEY: VALUE}): the body is a TOML inline table's inside."""
    name, sep, body = text.partition("=")
    if not sep or not name.strip():
        raise SystemExit(f"--mode {text!r}: expected NAME=OPTIONS, such as int8='load_in_8bit = true'")
    try:
        return name.strip(), tomllib.loads(f"spec = {{{body}}}")["spec"]
    except tomllib.TOMLDecodeError as exc:
        raise SystemExit(f"--mode {text!r}: {exc}") from None


class PipeserveSide:
    """One server process per mode, preloading the model as the text-generation default; this
    process is its client over a real gRPC channel."""

    def __init__(self, name: str, model: str, spec: dict, threads: int, streams: int, work: Path):
        self.name = name
        self.spec = spec
        config = work / f"pipeserve-{name}.toml"
        lines = ["embedded_defaults = false", f"max_streams_per_client = {max(16, streams)}", "",
                 '[preload."text-generation"]', f"model = {toml_value(model)}"]
        lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in spec.items()]
        config.write_text("\n".join(lines) + "\n")
        self.log_path = work / f"pipeserve-{name}.log"
        self.started = time.perf_counter()
        # The compute lane takes torch's thread count, which OMP_NUM_THREADS sets.
        self.process, port = start_server(["--config", str(config)], self.log_path,
                                          env={"OMP_NUM_THREADS": str(threads)})
        self.address = f"127.0.0.1:{port}"
        self.pid = self.process.pid
        self.load_s = None

    def wait(self) -> None:
        wait_serving(int(self.address.rpartition(":")[2]), [SERVICE], self.process, timeout=1200)
        self.load_s = time.perf_counter() - self.started

    def info(self) -> dict:
        import grpc
        from google.protobuf.json_format import MessageToDict

        from pipeserve.v1 import model_pb2, model_pb2_grpc

        with grpc.insecure_channel(self.address) as channel:
            models = model_pb2_grpc.ModelServiceStub(channel).ListModels(model_pb2.ListModelsRequest(), timeout=60)
        info = MessageToDict(models.models[0], preserving_proto_field_name=True)
        info["bytes"] = int(info.get("bytes", 0))  # int64 fields come as strings in JSON
        info["memory"] = {k: int(v) for k, v in info.get("memory", {}).items()}
        return {"engine": "pipeserve (gRPC server)", "load_options": self.spec, "load_s": self.load_s,
                **{k: info.get(k) for k in ("name", "family", "dtype", "bytes", "quantized_int8", "memory")}}

    def generate(self, text: str, new_tokens: int) -> dict:
        _, (stream,) = grpc_crowd(self.address, "", [text], new_tokens)
        return stream

    def crowd(self, texts: list[str], new_tokens: int) -> tuple[float, list[dict]]:
        return grpc_crowd(self.address, "", texts, new_tokens)

    def memory(self) -> dict:
        return process_memory(self.pid)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class ChildSide:
    """llama.cpp or transformers in a child process (side_protocol.py)."""

    def __init__(self, name: str, argv: list[str], work: Path, env: dict | None = None):
        self.name = name
        self.side = Side(name, argv, work / f"{name}.log", env=env)
        self.pid = self.side.pid
        self._info = None

    def wait(self) -> None:
        self._info = self.side.call("info")  # answered once the model has loaded

    def info(self) -> dict:
        return self._info

    def tokenize(self, text: str) -> list[int]:
        return self.side.call("tokenize", text=text)["ids"]

    def generate(self, text: str, new_tokens: int) -> dict:
        return self.side.call("generate", text=text, new_tokens=new_tokens)

    def memory(self) -> dict:
        return self.side.call("memory")

    def close(self) -> None:
        self.side.close()


def llama_cpp_python(given: str | None) -> str:
    """The llama-cpp-python virtualenv's Python: --llama-python, else the setup script's (which
    builds it the first time)."""
    if given:
        return given
    out = subprocess.run([str(HERE / "setup_llama_cpp")], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


# ---- the run -------------------------------------------------------------------------------------

def single_figures(runs: list[dict], new_tokens: int) -> dict:
    """Best-of-rounds figures of one side's single-stream runs."""
    decode = [(new_tokens - 1) / (r["seconds"] - r["ttft_s"]) for r in runs]
    return {
        "ttft_ms": 1000 * min(r["ttft_s"] for r in runs),
        "tokens_per_s": new_tokens / min(r["seconds"] for r in runs),
        "decode_tokens_per_s": max(decode),
        "every_round": [{"ttft_ms": round(1000 * r["ttft_s"], 1), "tokens_per_s": round(new_tokens / r["seconds"], 2),
                         "decode_tokens_per_s": round(d, 2)} for r, d in zip(runs, decode)],
    }


def crowd_figures(runs: list[tuple[float, list[dict]]], new_tokens: int) -> dict:
    produced = len(runs[0][1]) * new_tokens
    best_wall, best = min(runs, key=lambda run: run[0])
    return {
        "streams": len(best), "aggregate_tokens_per_s": produced / best_wall,
        "mean_ttft_ms": 1000 * sum(s["ttft_s"] for s in best) / len(best),
        "max_ttft_ms": 1000 * max(s["ttft_s"] for s in best),
        "every_round_tokens_per_s": [round(produced / wall, 1) for wall, _ in runs],
    }


def compare(a: list[int], b: list[int]) -> dict:
    return {"first_difference": first_difference(a, b), "equal_positions": sum(x == y for x, y in zip(a, b)),
            "of": max(len(a), len(b))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a .gguf file (default: the embedded Gemma 3 270M, assembled on first use)")
    parser.add_argument("--mode", action="append", metavar="NAME=OPTIONS",
                        help="a pipeserve mode: the preload's load options as the inside of a TOML inline table, "
                             "such as int8='load_in_8bit = true'; repeatable (default: float32 and int8). "
                             "The first is compared with transformers")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, default=16, help="concurrent GenerateStream calls for the crowd")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; each figure is the best")
    parser.add_argument("--threads", type=int, default=2, help="compute threads on every side")
    parser.add_argument("--n-batch", type=int, default=512, help="llama.cpp's prompt batch")
    parser.add_argument("--llama-python", help="the llama-cpp-python virtualenv's python (default: setup_llama_cpp's)")
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--llama-openmp-defaults", action="store_true",
                        help="also run llama.cpp with libgomp's default spinning (slow on a loaded machine)")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if not 1 <= args.streams <= len(PROMPTS):
        raise SystemExit(f"--streams: 1 to {len(PROMPTS)} (one prompt each)")
    modes = [parse_mode(m) for m in (args.mode or DEFAULT_MODES)]

    from pipeserve.checkpoints.embedded import embedded_model_dir

    if args.model:
        gguf = Path(args.model).resolve()
        served = str(gguf)
    else:
        directory = embedded_model_dir("text-generation")
        if directory is None:
            raise SystemExit("the embedded Gemma 3 270M is not installed (scripts/setup installs its packages)")
        gguf = next(directory.glob("*.gguf"))
        served = EMBEDDED
    env = environment("llama-cpp-python", "gguf", "accelerate")
    print_environment(env)
    work = Path(tempfile.mkdtemp(prefix="bench-real-gemma-"))
    print(f"logs in {work}", flush=True)

    # Start every side at once (loads overlap; each one's load time is reported, not compared).
    sides: dict = {}
    try:
        if not args.no_llama_cpp:
            llama = [llama_cpp_python(args.llama_python), str(HERE / "llama_cpp_side.py"), "--model", str(gguf),
                     "--threads", str(args.threads), "--n-batch", str(args.n_batch)]
            sides[LLAMA] = ChildSide(LLAMA, llama, work, env=dict(os.environ, PYTHONPATH=""))
            if args.llama_openmp_defaults:
                libgomp = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
                sides[LLAMA_GOMP] = ChildSide(LLAMA_GOMP, llama, work, env=dict(libgomp, PYTHONPATH=""))
        for name, spec in modes:
            sides[f"pipeserve {name}"] = PipeserveSide(name, served, spec, args.threads, args.streams, work)
        if not args.no_transformers:
            sides["transformers"] = ChildSide("transformers", [
                sys.executable, str(HERE / "transformers_side.py"), "--model", str(gguf),
                "--threads", str(args.threads)], work, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        for name, side in sides.items():
            side.wait()
            print(f"{name}: loaded", flush=True)
        results = run(sides, modes, args, gguf, env)
    finally:
        for side in sides.values():
            side.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "real_gemma.json").write_text(json.dumps(results, indent=2))
    (args.out / "real_gemma.md").write_text(markdown(results))
    print(markdown(results))
    parity = results["tokens"].get("pipeserve_float32_vs_transformers")
    if parity and parity["first_difference"] is not None:
        raise SystemExit(f"pipeserve {modes[0][0]} and transformers' greedy tokens differ at new token "
                         f"{parity['first_difference']}")


def run(sides: dict, modes: list[tuple[str, dict]], args, gguf: Path, env: dict) -> dict:
    prompt = PROMPTS[0]
    crowd_prompts = PROMPTS[:args.streams]
    ours = [f"pipeserve {name}" for name, _ in modes]
    results: dict = {
        "model": f"Gemma 3 270M, {gguf.name}", "gguf": str(gguf), "environment": env, "threads": args.threads,
        "new_tokens": args.new_tokens, "streams": args.streams, "repeats": args.repeats, "prompt": prompt,
        "decoding": "greedy, exactly new_tokens tokens on every side",
        "sides": {name: side.info() for name, side in sides.items()},
        "memory_after_load": {name: side.memory() for name, side in sides.items()},
    }
    for side in sides.values():  # warm-up: first calls pay one-time costs (allocations, kernel selection)
        side.generate(prompt, 8)
    for name in ours:
        sides[name].crowd(crowd_prompts[:2], 4)
    singles: dict[str, list[dict]] = {name: [] for name in sides}
    crowds: dict[str, list] = {name: [] for name in ours}
    for round_ in range(args.repeats):
        for name, side in sides.items():
            singles[name].append(side.generate(prompt, args.new_tokens))
            r = singles[name][-1]
            print(f"round {round_} {name}: TTFT {1000 * r['ttft_s']:.0f} ms, "
                  f"{args.new_tokens / r['seconds']:.1f} tokens/s", flush=True)
        for name in ours:
            crowds[name].append(sides[name].crowd(crowd_prompts, args.new_tokens))
            wall, streams = crowds[name][-1]
            assert all(len(s["ids"]) == args.new_tokens for s in streams)
            print(f"round {round_} {name} x{args.streams}: {args.streams * args.new_tokens / wall:.1f} tokens/s",
                  flush=True)
    results["memory_after_runs"] = {name: side.memory() for name, side in sides.items()}
    results["single"] = {name: single_figures(runs, args.new_tokens) for name, runs in singles.items()}
    results["crowd"] = {name: crowd_figures(runs, args.new_tokens) for name, runs in crowds.items()}
    last = {name: runs[-1] for name, runs in singles.items()}
    for name, r in last.items():
        assert len(r["ids"]) == args.new_tokens, (name, len(r["ids"]))
        # Greedy decoding is deterministic: every round of a side gives the same tokens.
        assert all(run["ids"] == r["ids"] for run in singles[name]), f"{name}: tokens changed between rounds"
    results["prompt_tokens"] = {name: r["prompt_tokens"] for name, r in last.items()}
    if "llama.cpp" in sides and "transformers" in sides:
        results["prompt_ids_equal_llama_cpp_transformers"] = (
            sides["llama.cpp"].tokenize(prompt) == sides["transformers"].tokenize(prompt))
    results["texts"] = {name: r["text"] for name, r in last.items()}
    results["ids"] = {name: r["ids"] for name, r in last.items()}
    if "llama.cpp" in last:
        results["llama_cpp_eos_banned"] = last["llama.cpp"].get("eos_banned")
    tokens: dict = {}
    first = ours[0]
    # keyed by the sides' own names: the first pipeserve side is float32 only when --mode asked for it
    if "transformers" in last:
        key = "pipeserve_float32_vs_transformers" if first == "pipeserve float32" else f"{first}_vs_transformers"
        tokens[key] = compare(last[first]["ids"], last["transformers"]["ids"])
    if "llama.cpp" in last:
        tokens[f"llama.cpp_vs_{first}"] = compare(last["llama.cpp"]["ids"], last[first]["ids"])
        if "transformers" in last:
            tokens["llama_cpp_vs_transformers"] = compare(last["llama.cpp"]["ids"], last["transformers"]["ids"])
    for name in ours[1:]:
        tokens[f"{name}_vs_{first}"] = compare(last[name]["ids"], last[first]["ids"])
    for name in ours:  # the crowd's stream of the single-stream prompt, against the single stream
        tokens[f"{name}_crowd_row0_vs_single"] = compare(crowds[name][-1][1][0]["ids"], last[name]["ids"])
    results["tokens"] = tokens
    results["targets"] = {f"against {ref}": targets(results, ours, ref) for ref in (LLAMA, LLAMA_GOMP)
                          if ref in results["single"]}
    return results


def targets(r: dict, ours: list[str], reference: str) -> dict:
    """Issue #15's targets per pipeserve mode: single stream decodes faster than llama.cpp, TTFT
    below llama.cpp's, and the crowd's aggregate >= 6x llama.cpp's single stream (both including
    their prompt passes: the crowd's aggregate against llama.cpp's whole-call tokens/s)."""
    llama = r["single"][reference]
    out = {}
    for name in ours:
        single, crowd = r["single"][name], r["crowd"][name]
        out[name] = {
            "decode_vs_llama_cpp": single["decode_tokens_per_s"] / llama["decode_tokens_per_s"],
            "ttft_llama_cpp_over_ours": llama["ttft_ms"] / single["ttft_ms"],
            "crowd_vs_llama_cpp_single": crowd["aggregate_tokens_per_s"] / llama["tokens_per_s"],
        }
        out[name]["met"] = {"single_stream_faster": out[name]["decode_vs_llama_cpp"] > 1,
                            "ttft_below": out[name]["ttft_llama_cpp_over_ours"] > 1,
                            "crowd_at_least_6x": out[name]["crowd_vs_llama_cpp_single"] >= 6}
    return out


# ---- the report ----------------------------------------------------------------------------------

def markdown(r: dict) -> str:
    single, crowd, n = r["single"], r["crowd"], r["new_tokens"]
    llama = single.get("llama.cpp")
    mem = r["memory_after_runs"]
    lines = [
        f"# Text generation on real weights: {r['model']}, {r['threads']} threads on every side",
        "",
        environment_markdown(r["environment"]),
        "",
        f"Greedy, exactly {n} new tokens after the same text prompt "
        f"(each side's own token count, BOS included: "
        + ", ".join(f"{k} {v}" for k, v in r["prompt_tokens"].items())
        + f"). Best of {r['repeats']} interleaved rounds (every round in real_gemma.json). Ratios against "
        "llama.cpp: >1 means pipeserve is better (faster, or a shorter TTFT).",
        "",
        "| side | TTFT ms | tokens/s (whole call) | decode tokens/s | RSS after runs MiB | peak RSS MiB | vs llama.cpp: decode, TTFT |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in single.items():
        ratio = "" if llama is None or name.startswith("llama.cpp") else (
            f"{s['decode_tokens_per_s'] / llama['decode_tokens_per_s']:.2f}x, {llama['ttft_ms'] / s['ttft_ms']:.2f}x")
        lines.append(f"| {name}, 1 stream | {s['ttft_ms']:.0f} | {s['tokens_per_s']:.1f} | {s['decode_tokens_per_s']:.1f} | "
                     f"{mem[name]['rss_bytes'] / MiB:.0f} | {mem[name]['peak_bytes'] / MiB:.0f} | {ratio} |")
    for name, c in crowd.items():
        ratio = "" if llama is None else (f"{c['aggregate_tokens_per_s'] / llama['tokens_per_s']:.2f}x llama.cpp's "
                                          "1 stream (whole call)")
        lines.append(f"| {name}, {c['streams']} concurrent gRPC streams (aggregate; mean TTFT) | {c['mean_ttft_ms']:.0f} | "
                     f"{c['aggregate_tokens_per_s']:.1f} | | {mem[name]['rss_bytes'] / MiB:.0f} | "
                     f"{mem[name]['peak_bytes'] / MiB:.0f} | {ratio} |")
    lines.append("")
    for reference, by_mode in r.get("targets", {}).items():
        lines.append(f"Targets (issue #15), {reference}: " + "; ".join(
            f"{name}: single stream faster {'yes' if t['met']['single_stream_faster'] else 'no'} "
            f"({t['decode_vs_llama_cpp']:.2f}x), TTFT below {'yes' if t['met']['ttft_below'] else 'no'} "
            f"({t['ttft_llama_cpp_over_ours']:.2f}x), {r['streams']} streams >= 6x "
            f"{'yes' if t['met']['crowd_at_least_6x'] else 'no'} ({t['crowd_vs_llama_cpp_single']:.2f}x)"
            for name, t in by_mode.items()) + ".")
        lines.append("")
    t = r["tokens"]
    notes = []
    if "pipeserve_float32_vs_transformers" in t:
        c = t["pipeserve_float32_vs_transformers"]
        notes.append("pipeserve float32 vs transformers: " + (
            f"identical ({c['of']} tokens)" if c["first_difference"] is None else
            f"DIFFER from new token {c['first_difference']} ({c['equal_positions']}/{c['of']} positions equal)"))
    for key, c in t.items():
        if key == "pipeserve_float32_vs_transformers":
            continue
        what = key.replace("_vs_", " vs ").replace("_", " ")
        notes.append(f"{what}: " + ("identical" if c["first_difference"] is None else
                                    f"first divergence at new token {c['first_difference']}, "
                                    f"{c['equal_positions']}/{c['of']} positions equal"))
    if "prompt_ids_equal_llama_cpp_transformers" in r:
        notes.append(f"prompt ids, llama.cpp's tokenizer = transformers': {r['prompt_ids_equal_llama_cpp_transformers']}")
    if r.get("llama_cpp_eos_banned") is not None:
        notes.append("llama.cpp end-of-generation tokens banned: " + (
            "yes (greedy reached one within the tokens)" if r["llama_cpp_eos_banned"] else "no (greedy reached none)"))
    for name, info in r["sides"].items():
        if name.startswith("pipeserve"):
            kinds = ", ".join(f"{k.removesuffix('_bytes')} {v / MiB:.0f}" for k, v in info["memory"].items())
            notes.append(f"{name}: load options {info['load_options']}, model {info['bytes'] / MiB:.0f} MiB "
                         f"resident ({kinds}), serving {info['load_s']:.1f} s after its start (every side loads at once)")
        else:
            notes.append(f"{name}: " + ", ".join(f"{k} {v}" for k, v in info.items()
                                                 if k not in ("engine", "end_of_generation_tokens")))
    lines += [f"- {note}" for note in notes]
    lines += ["", "Greedy texts (last round):", ""]
    lines += [f"- {name}: {text!r}" for name, text in r["texts"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
