"""wav2vec2 row of the ASR benchmark: pipeserve vs transformers.pipeline on the same audio and
the same random weights of wav2vec2-base size (facebook/wav2vec2-base-960h's config, a
character vocabulary), long audio chunked the same way (chunk_length_s, default stride).

Every engine runs with the same chunking, batch size (chunks decoded together), float32, torch
thread count and the server's OpenMP settings, in its own subprocess so that peak memory is its
own; after a 2 s warm-up call, one timed run. --runs rounds, every engine once per round in
turn; each engine reports its best round. Reports the real-time factor (compute seconds / audio
seconds), peak RSS, whether the texts are identical, the CPU model and exact versions, and,
when the server's SpeechRecognitionService is available, the same call through gRPC.

    PYTHONPATH=service:tests python bench/asr/bench_wav2vec2.py --seconds 60 --threads 2 --runs 3
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
TEXT = ("the quick brown fox jumps over the lazy dog while the speech service transcribes every word "
        "as it arrives and sends it back with timestamps ")


def make_checkpoint(directory: Path) -> None:
    """Random weights of wav2vec2-base size with the character vocabulary of the 960h model."""
    import torch
    from transformers import (Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor,
                              Wav2Vec2ForCTC, Wav2Vec2Processor)

    sys.path.insert(0, str(ROOT / "tests"))
    from wav2vec2_checkpoints import VOCAB

    torch.manual_seed(0)
    model = Wav2Vec2ForCTC(Wav2Vec2Config(vocab_size=len(VOCAB), pad_token_id=0)).eval()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(VOCAB))
    model.save_pretrained(directory, safe_serialization=True)
    Wav2Vec2Processor(feature_extractor=Wav2Vec2FeatureExtractor(return_attention_mask=False),
                      tokenizer=Wav2Vec2CTCTokenizer(str(directory / "vocab.json"))).save_pretrained(directory)


def make_audio(path: Path, seconds: float) -> None:
    """Spoken English from espeak-ng (repeated to `seconds`), as 16 kHz float32 raw samples."""
    import numpy as np
    import soundfile

    sys.path.insert(0, str(ROOT / "service"))
    import torch
    from pipeserve.inputs.audio import load_audio_input

    wav = path.with_suffix(".wav")
    subprocess.run(["espeak-ng", "-w", str(wav), "-s", "160", TEXT * 3], check=True)
    data, rate = soundfile.read(str(wav), dtype="float32")
    speech = load_audio_input(waveform=torch.from_numpy(data), sample_rate=rate).numpy()
    reps = int(np.ceil(seconds * 16000 / speech.shape[0]))
    np.tile(speech, reps)[: int(seconds * 16000)].astype(np.float32).tofile(path)


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM starts anew at exec; ru_maxrss keeps the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_engine(engine: str, checkpoint: str, audio_path: str, chunk: float, threads: int, batch: int) -> dict:
    sys.path.insert(0, str(ROOT / "service"))
    from pipeserve.serving.openmp_defaults import apply_openmp_defaults

    apply_openmp_defaults()  # every engine, before torch loads
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    full = np.fromfile(audio_path, dtype=np.float32)
    audio = full[: 2 * 16000]  # the warm-up call's audio
    rss0 = peak_rss_mb()
    if engine == "transformers":
        from transformers import pipeline
        from transformers.utils import logging

        logging.set_verbosity_error()
        pipe = pipeline("automatic-speech-recognition", model=checkpoint, device="cpu")
        call = lambda: pipe(audio.copy(), chunk_length_s=chunk, batch_size=batch)["text"]  # noqa: E731
    elif engine == "pipeserve":
        sys.path.insert(0, str(ROOT / "service"))
        sys.path.insert(0, str(ROOT / "tests"))
        from harness import load_pipeline

        pipe = load_pipeline(Path(checkpoint))
        call = lambda: pipe.transcribe([torch.from_numpy(audio)], {"chunk_length_s": chunk, "batch_size": batch})[0].text  # noqa: E731
    elif engine == "pipeserve-grpc":
        sys.path[:0] = [str(ROOT / "service"), str(ROOT / "tests"), str(ROOT / "clients" / "python")]
        from grpc_testing import load_model, make_server
        from pipeserve.v1 import common_pb2, speech_recognition_pb2 as pb, speech_recognition_pb2_grpc as pbg

        handle = make_server()
        load_model(handle, checkpoint)
        stub = pbg.SpeechRecognitionServiceStub(handle.channel)
        options = pb.TranscriptionOptions(chunk_length_s=chunk, batch_size=batch)

        def call():
            raw = common_pb2.RawAudio(samples=audio.tobytes(), format=common_pb2.SAMPLE_FORMAT_FLOAT32_LE,
                                      sample_rate=16000, channels=1)
            request = pb.TranscribeRequest(model=checkpoint, audio=common_pb2.AudioInput(raw=raw), options=options)
            return stub.Transcribe(request, timeout=600).transcription.text
    else:
        raise SystemExit(f"unknown engine {engine}")
    call()  # warm-up on 2 s, outside the timing
    audio = full
    call_start = time.perf_counter()
    text = call()
    elapsed = time.perf_counter() - call_start
    return {"engine": engine, "seconds": elapsed, "rtf": elapsed / (audio.shape[0] / 16000),
            "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss0, "text": text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="audio length")
    parser.add_argument("--chunk", type=float, default=10.0, help="chunk_length_s for both engines")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1, help="chunks decoded together, every engine")
    parser.add_argument("--runs", type=int, default=3, help="interleaved rounds; each engine reports its best")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--audio", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.engine:
        print(json.dumps(run_engine(args.engine, args.checkpoint, args.audio, args.chunk, args.threads, args.batch_size)))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-w2v-"))
    make_checkpoint(work / "ckpt")
    make_audio(work / "audio.f32", args.seconds)
    engines = ["transformers", "pipeserve"]
    if (ROOT / "service" / "pipeserve" / "api" / "speech_recognition.py").exists():
        engines.append("pipeserve-grpc")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("service", "tests", "clients/python"))}
    env.pop("GOMP_SPINCOUNT", None)  # each child applies the server's OpenMP settings itself
    sys.path[:0] = [str(ROOT / "service"), str(ROOT / "bench")]
    from bench_env import environment, environment_markdown

    machine = environment()
    print(environment_markdown(machine), flush=True)
    best: dict[str, dict] = {}
    for round_ in range(args.runs):
        for engine in engines:
            out = subprocess.run([sys.executable, __file__, "--engine", engine, "--checkpoint", str(work / "ckpt"),
                                  "--audio", str(work / "audio.f32"), "--chunk", str(args.chunk),
                                  "--threads", str(args.threads), "--batch-size", str(args.batch_size)],
                                 capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(f"{engine} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
                continue
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"round {round_ + 1} {engine}: {result['seconds']:.2f} s", flush=True)
            every = best.get(engine, {}).get("every_round_seconds", []) + [round(result["seconds"], 3)]
            if engine not in best or result["seconds"] < best[engine]["seconds"]:
                best[engine] = result
            best[engine]["every_round_seconds"] = every
    results = list(best.values())
    reference = best.get("transformers")
    print(f"wav2vec2-base (random weights), {args.seconds:.0f} s of espeak-ng speech, chunk_length_s={args.chunk}, "
          f"batch {args.batch_size} for every engine, {args.threads} threads, float32, CPU, best of {args.runs} rounds")
    print(f"{'engine':16} {'seconds':>8} {'RTF':>7} {'peak RSS MB':>12} {'speedup':>8} same text  every round")
    for r in results:
        speedup = reference["seconds"] / r["seconds"] if reference else float("nan")
        same = reference is not None and r["text"] == reference["text"]
        r["same_text_as_transformers"] = same
        print(f"{r['engine']:16} {r['seconds']:8.2f} {r['rtf']:7.3f} {r['peak_rss_mb']:12.0f} {speedup:8.2f} {same!s:9}  "
              f"{r['every_round_seconds']}")
    if args.out:
        args.out.write_text(json.dumps({"seconds_of_audio": args.seconds, "chunk_length_s": args.chunk,
                                        "batch_size": args.batch_size, "threads": args.threads, "runs": args.runs,
                                        "environment": machine, "engines": results}, indent=2))


if __name__ == "__main__":
    main()
