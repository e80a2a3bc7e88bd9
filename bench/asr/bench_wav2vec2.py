"""wav2vec2 row of the ASR benchmark: pipeserve vs transformers.pipeline on the same audio and
the same random weights of wav2vec2-base size (facebook/wav2vec2-base-960h's config, a
character vocabulary), long audio chunked the same way (chunk_length_s, default stride).

Each engine runs in its own subprocess so peak memory (ru_maxrss) is its own. Reports the
real-time factor (compute seconds / audio seconds), peak RSS, whether the texts are identical,
and, when the server's SpeechRecognitionService is available, the same call through gRPC.

    PYTHONPATH=service:tests python bench/asr/bench_wav2vec2.py --seconds 60 --threads 2
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


def run_engine(engine: str, checkpoint: str, audio_path: str, chunk: float, threads: int, batch: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    audio = np.fromfile(audio_path, dtype=np.float32)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if engine == "transformers":
        from transformers import pipeline
        from transformers.utils import logging

        logging.set_verbosity_error()
        pipe = pipeline("automatic-speech-recognition", model=checkpoint, device="cpu")
        call = lambda: pipe(audio.copy(), chunk_length_s=chunk)["text"]  # noqa: E731
    elif engine == "pipeserve":
        sys.path.insert(0, str(ROOT / "service"))
        sys.path.insert(0, str(ROOT / "tests"))
        from harness import load_pipeline

        pipe = load_pipeline(Path(checkpoint))
        wave = torch.from_numpy(audio)
        call = lambda: pipe.transcribe([wave], {"chunk_length_s": chunk, "batch_size": batch})[0].text  # noqa: E731
    elif engine == "pipeserve-grpc":
        sys.path[:0] = [str(ROOT / "service"), str(ROOT / "tests"), str(ROOT / "clients" / "python")]
        from grpc_testing import load_model, make_server
        from pipeserve.v1 import common_pb2, speech_recognition_pb2 as pb, speech_recognition_pb2_grpc as pbg

        handle = make_server()
        load_model(handle, checkpoint)
        stub = pbg.SpeechRecognitionServiceStub(handle.channel)
        raw = common_pb2.RawAudio(samples=audio.tobytes(), format=common_pb2.SAMPLE_FORMAT_FLOAT32_LE,
                                  sample_rate=16000, channels=1)
        request = pb.TranscribeRequest(model=checkpoint, audio=common_pb2.AudioInput(raw=raw),
                                       options=pb.TranscriptionOptions(chunk_length_s=chunk, batch_size=batch))
        call = lambda: stub.Transcribe(request, timeout=600).transcription.text  # noqa: E731
    else:
        raise SystemExit(f"unknown engine {engine}")
    call_start = time.perf_counter()
    text = call()  # one run, as the issue asks (the first call includes any lazy warm-up)
    elapsed = time.perf_counter() - call_start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"engine": engine, "seconds": elapsed, "rtf": elapsed / (audio.shape[0] / 16000),
            "peak_rss_mb": peak_mb, "rss_before_mb": rss0 / 1024, "text": text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="audio length")
    parser.add_argument("--chunk", type=float, default=10.0, help="chunk_length_s for both engines")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1, help="pipeserve's chunk batch (transformers: 1)")
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
    results = []
    for engine in engines:
        out = subprocess.run([sys.executable, __file__, "--engine", engine, "--checkpoint", str(work / "ckpt"),
                              "--audio", str(work / "audio.f32"), "--chunk", str(args.chunk),
                              "--threads", str(args.threads), "--batch-size", str(args.batch_size)], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            print(f"{engine} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    reference = next((r for r in results if r["engine"] == "transformers"), None)
    print(f"wav2vec2-base (random weights), {args.seconds:.0f} s of espeak-ng speech, chunk_length_s={args.chunk}, "
          f"{args.threads} threads, CPU")
    print(f"{'engine':16} {'seconds':>8} {'RTF':>7} {'peak RSS MB':>12} {'speedup':>8} same text")
    for r in results:
        speedup = reference["seconds"] / r["seconds"] if reference else float("nan")
        same = reference is not None and r["text"] == reference["text"]
        print(f"{r['engine']:16} {r['seconds']:8.2f} {r['rtf']:7.3f} {r['peak_rss_mb']:12.0f} {speedup:8.2f} {same}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
