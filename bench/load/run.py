"""Load test: N concurrent clients across tasks, for a bounded time, against a pipeserve server
process started here on 127.0.0.1 (no other host is ever contacted).

Each client loops over the tasks in turn (one call in flight per client), so the server sees N
concurrent callers mixed across models. Speech recognition is driven three ways: Transcribe,
TranscribeStream (segments streamed) and StreamingTranscribe (live audio in chunks). Reported
per task and overall: calls, throughput, p50/p90/p99 latency, errors by status code and
ErrorInfo reason, the server's mean batch size per model (from its /metrics), and the server's
resident memory (RSS) after warm-up, at the end of the load and after an idle settle period,
to show that memory returns to its baseline instead of growing with the number of calls.

Past the queue bound (more clients than --max-queue lets wait) the only refusals allowed are
RESOURCE_EXHAUSTED / QUEUE_FULL, answered at once; a refused client backs off for the
retry_after_ms the server suggests and tries again. The report says whether that held.

Models: tiny random checkpoints built here with transformers (ViT image classification,
GPT-2 text generation, BERT text classification, Whisper speech recognition), or your own
with --model TASK=PATH (the three speech tasks share the speech-recognition model).

    PYTHONPATH=service:tests python bench/load/run.py --clients 16 --duration 30
    PYTHONPATH=service:tests python bench/load/run.py --clients 64 --max-queue 4 --duration 30
    PYTHONPATH=service:tests python bench/load/run.py --model image-classification=/models/vit --tasks image-classification
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "service"), str(ROOT / "tests"), str(ROOT / "bench")]

import bench_server  # noqa: E402
from bench_server import free_port, process_memory, wait_serving  # noqa: E402

LOOPBACK = "127.0.0.1"
TASKS = ("image-classification", "text-generation", "text-classification", "speech-recognition",
         "speech-recognition-stream", "speech-recognition-live")
SPEECH_TASKS = ("speech-recognition", "speech-recognition-stream", "speech-recognition-live")
# The server task whose model each load task uses.
MODEL_TASK = {**{t: t for t in TASKS}, **{t: "automatic-speech-recognition" for t in SPEECH_TASKS}}
SERVICES = {"image-classification": "pipeserve.v1.ImageClassificationService",
            "text-generation": "pipeserve.v1.TextGenerationService",
            "text-classification": "pipeserve.v1.TextClassificationService",
            "automatic-speech-recognition": "pipeserve.v1.SpeechRecognitionService"}
QUEUE_FULL = "RESOURCE_EXHAUSTED/QUEUE_FULL"


# ---- models ---------------------------------------------------------------------------------------
def build_models(tasks: list[str], directory: Path) -> dict[str, str]:
    """Server task -> a tiny random checkpoint for it."""
    out = {}
    if "image-classification" in tasks:
        from ops_testing import build_tiny_vit

        out["image-classification"] = str(build_tiny_vit(directory / "vit"))
    if "text-generation" in tasks:
        from generation_checkpoints import build

        build("gpt2", directory / "gpt2")
        out["text-generation"] = str(directory / "gpt2")
    if "text-classification" in tasks:
        from encoder_checkpoints import build_checkpoint

        path, _, _ = build_checkpoint("bert", "sequence_classification", directory / "bert")
        out["text-classification"] = str(path)
    if "automatic-speech-recognition" in tasks:
        import whisper_checkpoints

        out["automatic-speech-recognition"] = str(whisper_checkpoints.build(directory / "whisper", multilingual=False))
    return out


# ---- requests -------------------------------------------------------------------------------------
def request_makers(max_new_tokens: int):
    """task -> (stub module, stub class, method, request factory taking a counter). The live
    task's factory returns the list of messages the client streams."""
    import numpy as np

    from ops_testing import png
    from pipeserve.v1 import (common_pb2, image_classification_pb2 as image_pb, speech_recognition_pb2 as asr_pb,
                              text_classification_pb2 as text_pb, text_generation_pb2 as gen_pb)

    images = [png(seed, (64, 48)) for seed in range(16)]
    # One second of a tone per request (a different pitch each), 16 kHz float32.
    tones = [(0.2 * np.sin(np.arange(16000) * (0.02 + 0.01 * k))).astype("<f4").tobytes() for k in range(8)]
    asr_options = asr_pb.TranscriptionOptions(max_new_tokens=max_new_tokens)

    def audio(i: int):
        return common_pb2.AudioInput(raw=common_pb2.RawAudio(samples=tones[i % len(tones)], sample_rate=16000,
                                                             format=common_pb2.SAMPLE_FORMAT_FLOAT32_LE))

    def live(i: int):
        samples = tones[i % len(tones)]
        config = asr_pb.StreamingConfig(format=common_pb2.SAMPLE_FORMAT_FLOAT32_LE, sample_rate=16000, channels=1,
                                        options=asr_options)
        half = len(samples) // 2
        return [asr_pb.StreamingTranscribeRequest(config=config),
                asr_pb.StreamingTranscribeRequest(audio=asr_pb.AudioChunk(samples=samples[:half])),
                asr_pb.StreamingTranscribeRequest(audio=asr_pb.AudioChunk(samples=samples[half:]))]

    sentences = ["The quick brown fox jumps over the lazy dog.", "Hello world, how are you today?",
                 "Pipelines serve models over gRPC.", "Streaming text must equal the final text."]
    return {
        "image-classification": ("image_classification_pb2_grpc", "ImageClassificationServiceStub", "ClassifyImage",
                                 lambda i: image_pb.ClassifyImageRequest(
                                     image=common_pb2.ImageInput(data=images[i % len(images)]))),
        "text-generation": ("text_generation_pb2_grpc", "TextGenerationServiceStub", "Generate",
                            lambda i: gen_pb.GenerateRequest(prompt=sentences[i % len(sentences)],
                                                             options=gen_pb.GenerationOptions(
                                                                 max_new_tokens=max_new_tokens, ignore_eos=True))),
        "text-classification": ("text_classification_pb2_grpc", "TextClassificationServiceStub", "ClassifyText",
                                lambda i: text_pb.ClassifyTextRequest(text=sentences[i % len(sentences)])),
        "speech-recognition": ("speech_recognition_pb2_grpc", "SpeechRecognitionServiceStub", "Transcribe",
                               lambda i: asr_pb.TranscribeRequest(audio=audio(i), options=asr_options)),
        "speech-recognition-stream": ("speech_recognition_pb2_grpc", "SpeechRecognitionServiceStub", "TranscribeStream",
                                      lambda i: asr_pb.TranscribeStreamRequest(audio=audio(i), options=asr_options)),
        "speech-recognition-live": ("speech_recognition_pb2_grpc", "SpeechRecognitionServiceStub",
                                    "StreamingTranscribe", live),
    }


# ---- the server -----------------------------------------------------------------------------------
def start_server(models: dict[str, str], extra: list[str], log_path: Path) -> tuple[subprocess.Popen, int, int]:
    metrics_port = free_port()
    args = ["--metrics-listen", f"{LOOPBACK}:{metrics_port}", "--embedded-defaults", "false", *extra]
    for task, path in models.items():
        args += ["--preload", f"{task}={path}"]
    process, port = bench_server.start_server(args, log_path)
    return process, port, metrics_port


def batch_sizes(metrics_port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://{LOOPBACK}:{metrics_port}/metrics", timeout=10).read().decode()
    sums, counts = {}, {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "pipeserve_batch_size_sum":
                sums[s.labels["model"]] = sums.get(s.labels["model"], 0) + s.value
            elif s.name == "pipeserve_batch_size_count":
                counts[s.labels["model"]] = counts.get(s.labels["model"], 0) + s.value
    return {m: round(sums[m] / counts[m], 2) for m in sums if counts.get(m)}


# ---- the load -------------------------------------------------------------------------------------
def _refusal(exc) -> tuple[str, float]:
    """'CODE/REASON' of a failed call, and the backoff it suggests (seconds)."""
    from grpc_testing import error_reason

    reason = error_reason(exc)
    kind = f"{exc.code().name}/{reason}" if reason else exc.code().name
    retry_ms = 0.0
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(exc)
    for detail in (status.details if status else []):
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and "retry_after_ms" in info.metadata:
            retry_ms = float(info.metadata["retry_after_ms"])
    return kind, retry_ms / 1000.0


async def _invoke(call, method: str, request, timeout: float) -> None:
    if method == "StreamingTranscribe":
        # Through the sync API on a thread: grpc.aio's client overwrites the server's status
        # with INTERNAL "Internal error from Core" when a write races the server ending the
        # call (a QUEUE_FULL refusal while audio is still being sent; grpc/grpc#36066).
        await asyncio.get_running_loop().run_in_executor(None, lambda: list(call(iter(request), timeout=timeout)))
    elif method == "TranscribeStream":
        async for _ in call(request, timeout=timeout):
            pass
    else:
        await call(request, timeout=timeout)


async def run_load(port: int, tasks: list[str], clients: int, duration: float, max_new_tokens: int,
                   timeout: float) -> dict[str, dict]:
    import importlib

    import grpc

    from concurrent.futures import ThreadPoolExecutor

    makers = request_makers(max_new_tokens)
    results = {task: {"latencies": [], "errors": {}, "refusal_latencies": []} for task in tasks}
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max(4, clients)))
    sync_channel = grpc.insecure_channel(f"{LOOPBACK}:{port}")
    async with grpc.aio.insecure_channel(f"{LOOPBACK}:{port}") as channel:
        calls = {}
        for task in tasks:
            module, stub_name, method, factory = makers[task]
            stub_class = getattr(importlib.import_module(f"pipeserve.v1.{module}"), stub_name)
            stub = stub_class(sync_channel if method == "StreamingTranscribe" else channel)
            calls[task] = (getattr(stub, method), method, factory)
        stop_at = time.perf_counter() + duration

        async def client(index: int) -> None:
            i = index
            while time.perf_counter() < stop_at:
                task = tasks[i % len(tasks)]
                call, method, factory = calls[task]
                started = time.perf_counter()
                try:
                    await _invoke(call, method, factory(i), timeout)
                    results[task]["latencies"].append(time.perf_counter() - started)
                except grpc.RpcError as exc:  # AioRpcError, and the sync API's errors
                    kind, backoff = _refusal(exc)
                    errors = results[task]["errors"]
                    errors[kind] = errors.get(kind, 0) + 1
                    results[task]["refusal_latencies"].append(time.perf_counter() - started)
                    await asyncio.sleep(min(backoff, 1.0))
                i += 1

        await asyncio.gather(*(client(i) for i in range(clients)))
    sync_channel.close()
    return results


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summarize(raw: dict[str, dict], duration: float) -> dict:
    rows = {}
    everything = []
    for task, r in raw.items():
        lat = r["latencies"]
        everything += lat
        rows[task] = {"calls": len(lat), "errors": r["errors"], "throughput_per_s": round(len(lat) / duration, 2),
                      "refusal_p99_ms": round(percentile(r["refusal_latencies"], 99) * 1000, 2)
                      if r["refusal_latencies"] else None,
                      "p50_ms": round(percentile(lat, 50) * 1000, 2), "p90_ms": round(percentile(lat, 90) * 1000, 2),
                      "p99_ms": round(percentile(lat, 99) * 1000, 2),
                      "mean_ms": round(statistics.fmean(lat) * 1000, 2) if lat else None}
    rows["all"] = {"calls": len(everything), "errors": {k: sum(r["errors"].get(k, 0) for r in raw.values())
                                                         for r0 in raw.values() for k in r0["errors"]},
                   "throughput_per_s": round(len(everything) / duration, 2),
                   "p50_ms": round(percentile(everything, 50) * 1000, 2),
                   "p90_ms": round(percentile(everything, 90) * 1000, 2),
                   "p99_ms": round(percentile(everything, 99) * 1000, 2),
                   "mean_ms": round(statistics.fmean(everything) * 1000, 2) if everything else None}
    return rows


def markdown(report: dict) -> str:
    c = report["config"]
    lines = [f"# Load test: {c['clients']} clients, {c['duration_s']} s, tasks {', '.join(c['tasks'])}", "",
             f"Machine: {report['machine']}. Server on {LOOPBACK}, one call in flight per client, "
             f"max_batch_size {c['max_batch_size']}, max_batch_wait_ms {c['max_batch_wait_ms']}, "
             f"max_queue {c['max_queue']}, asr_max_batch_rows {c.get('asr_max_batch_rows', '-')}.", "",
             "| task | calls | refused / errors | refusal p99 ms | calls/s | p50 ms | p90 ms | p99 ms |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for task, row in report["results"].items():
        errors = ", ".join(f"{k} {v}" for k, v in row["errors"].items()) or "0"
        lines.append(f"| {task} | {row['calls']} | {errors} | {row.get('refusal_p99_ms') or '-'} | "
                     f"{row['throughput_per_s']} | {row['p50_ms']} | {row['p90_ms']} | {row['p99_ms']} |")
    r = report["refusals"]
    lines += ["", f"Refusals: {r['total']} ({', '.join(f'{k} {v}' for k, v in r['by_kind'].items()) or 'none'}); "
              f"only QUEUE_FULL: {'yes' if r['only_queue_full'] else 'NO'}."]
    m = report["memory"]
    lines += ["", "Mean batch size per model (server /metrics): " +
              ", ".join(f"{Path(k).name} {v}" for k, v in report["mean_batch_size"].items()), "",
              "| server RSS | MiB |", "| --- | ---: |",
              f"| after warm-up (baseline) | {m['baseline_mib']} |", f"| end of load | {m['end_of_load_mib']} |",
              f"| after {m['settle_s']} s idle | {m['settled_mib']} |", "",
              f"Settled RSS is {m['settled_delta_mib']:+.1f} MiB from the baseline "
              f"({m['settled_delta_pct']:+.1f} %): {'returned to baseline' if m['returned_to_baseline'] else 'GREW'} "
              f"(tolerance {m['tolerance_mib']} MiB).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--model", action="append", default=[], metavar="TASK=PATH",
                        help="use this checkpoint instead of a tiny random one")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--asr-max-batch-rows", type=int, default=16,
                        help="speech-recognition calls running at once per model (the server's setting)")
    parser.add_argument("--compute-lanes", type=int, default=1, help="the server's compute_lanes setting")
    parser.add_argument("--warmup-calls", type=int, default=3, help="per client and task, before the baseline")
    parser.add_argument("--settle", type=float, default=5.0, help="idle seconds before the last RSS reading")
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline of each call")
    parser.add_argument("--tolerance-mib", type=float, default=64.0,
                        help="settled RSS within this of the baseline counts as returned")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise SystemExit(f"unknown tasks {sorted(unknown)}; choose from {TASKS}")
    model_tasks = sorted({MODEL_TASK[t] for t in tasks})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="pipeserve-load-") as tmp:
        models = {MODEL_TASK.get(k, k): v for k, v in (m.split("=", 1) for m in args.model)}
        models.update(build_models([t for t in model_tasks if t not in models], Path(tmp)))
        process, port, metrics_port = start_server(
            models, ["--max-batch-size", str(args.max_batch_size), "--max-batch-wait-ms", str(args.max_batch_wait_ms),
                     "--max-queue", str(args.max_queue), "--asr-max-batch-rows", str(args.asr_max_batch_rows),
                     "--compute-lanes", str(args.compute_lanes)], Path(tmp) / "server.log")
        try:
            try:
                wait_serving(port, [SERVICES[t] for t in model_tasks], process)
            except SystemExit:
                print((Path(tmp) / "server.log").read_text()[-4000:], file=sys.stderr)
                raise
            # Warm-up: every code path, allocator pool and batch shape used by the load.
            warm_s = max(1.0, args.warmup_calls * len(tasks) * 0.05)
            asyncio.run(run_load(port, tasks, args.clients, warm_s, args.max_new_tokens, args.timeout))
            time.sleep(1.0)
            baseline = process_memory(process.pid)["rss_bytes"]
            raw = asyncio.run(run_load(port, tasks, args.clients, args.duration, args.max_new_tokens, args.timeout))
            end_of_load = process_memory(process.pid)["rss_bytes"]
            time.sleep(args.settle)
            settled = process_memory(process.pid)["rss_bytes"]
            mean_batch = batch_sizes(metrics_port)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()

    mib = 1 << 20
    delta = (settled - baseline) / mib
    results = summarize(raw, args.duration)
    refusals = results["all"]["errors"]
    report = {
        "config": {"clients": args.clients, "duration_s": args.duration, "tasks": tasks,
                   "max_new_tokens": args.max_new_tokens, "max_batch_size": args.max_batch_size,
                   "max_batch_wait_ms": args.max_batch_wait_ms, "max_queue": args.max_queue, "asr_max_batch_rows": args.asr_max_batch_rows,
                   "models": {t: Path(p).name for t, p in models.items()}},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "results": results,
        "refusals": {"total": sum(refusals.values()), "by_kind": refusals,
                     "only_queue_full": set(refusals) <= {QUEUE_FULL}},
        "mean_batch_size": mean_batch,
        "memory": {"baseline_mib": round(baseline / mib, 1), "end_of_load_mib": round(end_of_load / mib, 1),
                   "settled_mib": round(settled / mib, 1), "settle_s": args.settle,
                   "settled_delta_mib": round(delta, 1), "settled_delta_pct": round(100 * delta * mib / baseline, 1),
                   "tolerance_mib": args.tolerance_mib, "returned_to_baseline": delta <= args.tolerance_mib},
    }
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
