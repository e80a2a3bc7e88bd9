"""Cold start and resident memory of a speech-only server, side by side with faster-whisper.

pipeserve: a fresh `python -m pipeserve.server --embedded-defaults false --preload
automatic-speech-recognition=embedded/whisper-tiny.en` process per run; the clock starts just
before exec and stops at the first TranscribeResponse. The client waits as a client should: a health
Watch on SpeechRecognitionService (connecting with a 20-50 ms reconnect backoff until the port
is bound) until it is SERVING, then Transcribe (retrying UNAVAILABLE, which a server that
reports SERVING should not answer). Memory is read from the server's own
/proc/<pid>/status: VmRSS one second after the first transcript ("at rest"), again two seconds
later ("idle": the lanes have handed the heap's free pages back), then VmHWM after
`--calls` more transcriptions (the peak of the whole process, load included).

faster-whisper: a fresh process that imports faster_whisper, loads the same CTranslate2
weights (float32 compute, as pipeserve, unless --fw-compute says otherwise) and transcribes
the same clip; its own VmRSS/VmHWM at the end.

Both engines start from byte-compiled code, as installed packages do (pip compiles every
module it installs; faster-whisper's bench copy was installed so): the bench compiles the
server trees it runs first (`compileall`, into their gitignored __pycache__ folders), since a
source checkout under PYTHONDONTWRITEBYTECODE would otherwise compile the ~130 pipeserve
modules a speech server imports in every run (0.1-0.15 CPU s on the path to the first
transcript). `--no-compile`
measures a source tree as it is.

Runs alternate between the engines (pipeserve, faster-whisper, pipeserve, ...) so machine
load hits both alike; the report gives the median and the best of the runs. The clip is
espeak-ng speech (about 5 s).

The breakdown: pipeserve's own start-up log (`startup_timeline` lines: port listening,
runtime imported, services bound, default models loaded, in seconds since exec), the first
call (first transcript minus the later of "models loaded" and "services bound"), and each
process's CPU seconds (user + system) at its first transcript: on a machine shared with
other work the wall times stretch, the CPU seconds much less, so they are the quiet-machine
equivalent to compare (a quiet 2-core machine runs them in about that wall time, less what
two threads overlap). faster-whisper's child reports its import, load and transcribe times.

    .venv/bin/python bench/asr/bench_cold_start.py --runs 5 [--float16] [--out bench/asr/results]
"""
from __future__ import annotations

import argparse
import compileall
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from bench_server import cpu_seconds, free_port, process_memory_mib as proc_status  # noqa: E402

MiB = 1 << 20
FASTER_WHISPER_DEPS = Path.home() / ".cache" / "pipeserve-bench" / "faster-whisper-1.2.1"
SENTENCE = "The quick brown fox jumps over the lazy dog. Speech recognition should start quickly."


def make_clip(work: Path) -> Path:
    wav = work / "clip.wav"
    subprocess.run(["espeak-ng", "-s", "150", "-w", str(wav), SENTENCE], check=True)
    # 16 kHz mono, as both engines resample anyway (keeps decoding out of the comparison).
    out = work / "clip16.wav"
    subprocess.run(["sox", str(wav), "-r", "16000", "-c", "1", str(out)], check=True)
    return out


TIMELINE = re.compile(r"startup_timeline: (listening|runtime imported|default models done|services bound)"
                      r" at (\d+\.\d+)s after exec \(cpu (\d+\.\d+)s\)")


def timeline(log: str) -> dict[str, float]:
    """The server's `startup_timeline` log lines: stage -> seconds after exec, and the
    process's CPU seconds then (stage_cpu_s)."""
    stages = {}
    for stage, at, cpu in TIMELINE.findall(log):
        stages[f"{stage.replace(' ', '_')}_s"] = float(at)
        stages[f"{stage.replace(' ', '_')}_cpu_s"] = float(cpu)
    return stages


def rss_split(pid: int) -> dict[str, float]:
    """VmRSS's two parts: RssAnon (private memory: weights, heap, Python objects) and RssFile
    (mapped file pages: shared library code, weights mapped from their file), in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"rss_anon_rest_mib": int(fields["RssAnon"].split()[0]) / 1024,
            "rss_file_rest_mib": int(fields["RssFile"].split()[0]) / 1024}


def run_pipeserve(clip: Path, calls: int, extra: list[str], tree: Path | None = None,
                  preload: tuple[str, ...] = ("--preload", "automatic-speech-recognition=embedded/whisper-tiny.en")) -> dict:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from pipeserve.v1 import common_pb2, speech_recognition_pb2 as pb, speech_recognition_pb2_grpc as pb_grpc

    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if tree is not None:  # another source tree's server (its service/ first on the path)
        env["PYTHONPATH"] = os.pathsep.join([str(tree / "service"), str(ROOT / "clients" / "python")])
    log = tempfile.TemporaryFile("w+")
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "pipeserve.server", "--listen", f"127.0.0.1:{port}",
                               "--embedded-defaults", "false", *preload, *extra],
                              env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        # Reconnect quickly while the port is not bound yet (grpc's default backoff waits ~1 s).
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[
            ("grpc.initial_reconnect_backoff_ms", 20), ("grpc.min_reconnect_backoff_ms", 20),
            ("grpc.max_reconnect_backoff_ms", 50)])
        stub = pb_grpc.SpeechRecognitionServiceStub(channel)
        request = pb.TranscribeRequest(audio=common_pb2.AudioInput(data=clip.read_bytes()))
        # As a client should wait: a health Watch on the service, which the server answers as
        # soon as its port is bound and updates when the service turns SERVING (no polling).
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="pipeserve.v1.SpeechRecognitionService"), timeout=300,
            wait_for_ready=True)
        for reply in watch:
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                watch.cancel()
                break
        while True:
            try:
                response = stub.Transcribe(request, timeout=60, wait_for_ready=False)
                break
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or server.poll() is not None:
                    raise
                time.sleep(0.01)
        first = time.perf_counter() - started
        cpu = cpu_seconds(server.pid)
        time.sleep(1.0)
        rest = proc_status(server.pid)["VmRSS"]
        split = rss_split(server.pid)  # at rest: private (anonymous) and file-backed pages
        # ...and once the compute lanes have been idle long enough to hand the heap's free
        # pages back (IDLE_AFTER_S = 1 s in scheduling/compute.py, heap_mmap_threshold_busy_bytes)
        time.sleep(2.0)
        idle = proc_status(server.pid)["VmRSS"]
        idle_split = {key.replace("_rest_", "_idle_"): value for key, value in rss_split(server.pid).items()}
        for _ in range(calls):
            stub.Transcribe(request, timeout=60)
        after = proc_status(server.pid)
        channel.close()
        log.seek(0)
        stages = timeline(log.read())
        ready = max(stages.get("default_models_done_s", 0.0), stages.get("services_bound_s", 0.0))
        return {"first_transcript_s": first, "cpu_s": cpu, **stages, "first_call_s": first - ready,
                "rss_rest_mib": rest, "rss_idle_mib": idle, **idle_split, "rss_after_mib": after["VmRSS"], **split,
                "peak_mib": after["VmHWM"], "text": response.transcription.text.strip()}
    finally:
        server.terminate()
        server.wait(30)
        log.close()


FASTER_WHISPER_CHILD = """
import os, sys, time
started = time.perf_counter()
from pathlib import Path
from faster_whisper import WhisperModel
imported = time.perf_counter()
model = WhisperModel(sys.argv[1], device="cpu", compute_type=sys.argv[3], cpu_threads=2)
loaded = time.perf_counter()
segments, info = model.transcribe(sys.argv[2], beam_size=1, temperature=0.0)
text = "".join(s.text for s in segments)
done = time.perf_counter()
cpu = os.times().user + os.times().system
status = {l.split(':')[0]: int(l.split()[1]) / 1024 for l in Path('/proc/self/status').read_text().splitlines()
          if l.startswith(('VmRSS', 'VmHWM', 'RssAnon', 'RssFile'))}
print(repr((text.strip(), status['VmRSS'], status['VmHWM'], status['RssAnon'], status['RssFile'], cpu,
            imported - started, loaded - imported, done - loaded)))
"""


def run_faster_whisper(clip: Path, model_dir: Path, compute: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(FASTER_WHISPER_DEPS))
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", FASTER_WHISPER_CHILD, str(model_dir), str(clip), compute],
                         env=env, capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - started
    text, rss, peak, anon, file, cpu, imports, load, call = eval(out.stdout.strip().splitlines()[-1])  # our own child's repr
    return {"first_transcript_s": elapsed, "cpu_s": cpu, "import_s": imports, "load_s": load, "first_call_s": call,
            "rss_rest_mib": rss, "rss_anon_rest_mib": anon, "rss_file_rest_mib": file, "peak_mib": peak,
            "text": text}


def summary(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if k != "text" and all(k in r for r in rows)]
    return {"runs": len(rows), "text": rows[0]["text"],
            **{f"{k}_median": statistics.median(r[k] for r in rows) for k in keys},
            **{f"{k}_best": min(r[k] for r in rows) for k in keys}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5, help="transcriptions after the first, for the peak")
    parser.add_argument("--float16", action="store_true",
                        help="also run the server with the model's weights_dtype = \"float16\" ([preload] spec)")
    parser.add_argument("--fw-compute", default="float32")
    parser.add_argument("--no-faster-whisper", action="store_true")
    parser.add_argument("--baseline-tree", type=Path,
                        help="also run the server of this source tree (e.g. `git archive <commit> service | tar -x`)")
    parser.add_argument("--no-compile", action="store_true",
                        help="do not byte-compile the server trees first (run them as the checkout is)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not args.no_compile:
        for tree in (ROOT, args.baseline_tree):
            if tree is not None:
                for folder in (tree / "service", ROOT / "clients" / "python"):
                    compileall.compile_dir(folder, quiet=1)
    from pipeserve.checkpoints.embedded import embedded_model_dir

    model_dir = embedded_model_dir("automatic-speech-recognition")
    engines = {"pipeserve": lambda clip: run_pipeserve(clip, args.calls, [])}
    if args.baseline_tree:
        engines["pipeserve baseline"] = lambda clip: run_pipeserve(clip, args.calls, [], args.baseline_tree.resolve())
    if args.float16:
        settings = Path(tempfile.mkdtemp()) / "float16.toml"
        settings.write_text('[preload]\n"automatic-speech-recognition" = '
                            '{model = "embedded/whisper-tiny.en", weights_dtype = "float16"}\n')
        engines["pipeserve float16 weights"] = lambda clip: run_pipeserve(clip, args.calls, [],
                                                                          preload=("--config", str(settings)))
        if args.baseline_tree:
            engines["pipeserve baseline float16 weights"] = lambda clip: run_pipeserve(
                clip, args.calls, [], args.baseline_tree.resolve(), ("--config", str(settings)))
    if not args.no_faster_whisper and (FASTER_WHISPER_DEPS / "faster_whisper").is_dir():
        engines[f"faster-whisper {args.fw_compute}"] = lambda clip: run_faster_whisper(clip, model_dir,
                                                                                       args.fw_compute)
    results: dict[str, list[dict]] = {name: [] for name in engines}
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_clip(Path(tmp))
        for round_ in range(args.runs):
            for name, run in engines.items():
                row = run(clip)
                results[name].append(row)
                stages = ", ".join(f"{k[:-2]} {v:.2f}" for k, v in row.items()
                                   if k.endswith("_s") and not k.endswith("cpu_s") and k != "first_transcript_s")
                print(f"round {round_} {name}: first transcript {row['first_transcript_s']:.2f} s "
                      f"(cpu {row['cpu_s']:.2f} s; {stages}), "
                      f"rest {row['rss_rest_mib']:.0f} MiB (anon {row.get('rss_anon_rest_mib', 0):.0f}, "
                      f"file {row.get('rss_file_rest_mib', 0):.0f}), idle {row.get('rss_idle_mib', row['rss_rest_mib']):.0f} MiB, "
                      f"peak {row['peak_mib']:.0f} MiB  "
                      f"{row['text'][:50]!r}",
                      flush=True)
    report = {name: summary(rows) for name, rows in results.items()}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cold_start.json").write_text(json.dumps({"report": report, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
