"""Cold start and resident memory of a speech-only server, side by side with faster-whisper.

pipeserve: a fresh `python -m pipeserve.server --embedded-defaults false --preload
automatic-speech-recognition=embedded/whisper-tiny.en` process per run; the clock starts just
before exec and stops at the first TranscribeResponse (the client retries UNAVAILABLE while
the server starts: connection refused, then STARTING). Memory is read from the server's own
/proc/<pid>/status: VmRSS one second after the first transcript ("at rest"), then VmHWM after
`--calls` more transcriptions (the peak of the whole process, load included).

faster-whisper: a fresh process that imports faster_whisper, loads the same CTranslate2
weights (float32 compute, as pipeserve, unless --fw-compute says otherwise) and transcribes
the same clip; its own VmRSS/VmHWM at the end.

Runs alternate between the engines (pipeserve, faster-whisper, pipeserve, ...) so machine
load hits both alike; the report gives the median and the best of the runs. The clip is
espeak-ng speech (about 5 s).

    .venv/bin/python bench/asr/bench_cold_start.py --runs 5 [--float16] [--out bench/asr/results]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from bench_server import free_port, process_memory  # noqa: E402

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


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM in MiB."""
    memory = process_memory(pid)
    return {"VmRSS": memory["rss_bytes"] / MiB, "VmHWM": memory["peak_bytes"] / MiB}


def run_pipeserve(clip: Path, calls: int, extra: list[str]) -> dict:
    import grpc
    from pipeserve.v1 import common_pb2, speech_recognition_pb2 as pb, speech_recognition_pb2_grpc as pb_grpc

    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "pipeserve.server", "--listen", f"127.0.0.1:{port}",
                               "--embedded-defaults", "false",
                               "--preload", "automatic-speech-recognition=embedded/whisper-tiny.en", *extra],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.SpeechRecognitionServiceStub(channel)
        request = pb.TranscribeRequest(audio=common_pb2.AudioInput(data=clip.read_bytes()))
        while True:
            try:
                response = stub.Transcribe(request, timeout=60, wait_for_ready=False)
                break
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or server.poll() is not None:
                    raise
                time.sleep(0.01)
        first = time.perf_counter() - started
        time.sleep(1.0)
        rest = proc_status(server.pid)["VmRSS"]
        for _ in range(calls):
            stub.Transcribe(request, timeout=60)
        after = proc_status(server.pid)
        channel.close()
        return {"first_transcript_s": first, "rss_rest_mib": rest, "rss_after_mib": after["VmRSS"],
                "peak_mib": after["VmHWM"], "text": response.transcription.text.strip()}
    finally:
        server.terminate()
        server.wait(30)


FASTER_WHISPER_CHILD = """
import sys, time
from pathlib import Path
from faster_whisper import WhisperModel
model = WhisperModel(sys.argv[1], device="cpu", compute_type=sys.argv[3], cpu_threads=2)
segments, info = model.transcribe(sys.argv[2], beam_size=1, temperature=0.0)
text = "".join(s.text for s in segments)
status = {l.split(':')[0]: int(l.split()[1]) / 1024 for l in Path('/proc/self/status').read_text().splitlines()
          if l.startswith(('VmRSS', 'VmHWM'))}
print(repr((text.strip(), status['VmRSS'], status['VmHWM'])))
"""


def run_faster_whisper(clip: Path, model_dir: Path, compute: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(FASTER_WHISPER_DEPS))
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", FASTER_WHISPER_CHILD, str(model_dir), str(clip), compute],
                         env=env, capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - started
    text, rss, peak = eval(out.stdout.strip().splitlines()[-1])  # our own child's repr
    return {"first_transcript_s": elapsed, "rss_rest_mib": rss, "peak_mib": peak, "text": text}


def summary(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if k != "text"]
    return {"runs": len(rows), "text": rows[0]["text"],
            **{f"{k}_median": statistics.median(r[k] for r in rows) for k in keys},
            **{f"{k}_best": min(r[k] for r in rows) for k in keys}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5, help="transcriptions after the first, for the peak")
    parser.add_argument("--float16", action="store_true", help="also run the server with --weights-dtype float16")
    parser.add_argument("--fw-compute", default="float32")
    parser.add_argument("--no-faster-whisper", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from pipeserve.checkpoints.embedded import embedded_model_dir

    model_dir = embedded_model_dir("automatic-speech-recognition")
    engines = {"pipeserve": lambda clip: run_pipeserve(clip, args.calls, [])}
    if args.float16:
        engines["pipeserve float16 weights"] = lambda clip: run_pipeserve(clip, args.calls,
                                                                          ["--weights-dtype", "float16"])
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
                print(f"round {round_} {name}: first transcript {row['first_transcript_s']:.2f} s, "
                      f"rest {row['rss_rest_mib']:.0f} MiB, peak {row['peak_mib']:.0f} MiB  {row['text'][:50]!r}",
                      flush=True)
    report = {name: summary(rows) for name, rows in results.items()}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cold_start.json").write_text(json.dumps({"report": report, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
