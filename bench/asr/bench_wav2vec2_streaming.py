"""Live-streaming latency of wav2vec2 CTC through gRPC StreamingTranscribe: audio sent ->
text received.

A real server (in-process, real channel) serves a wav2vec2 checkpoint (random weights of
wav2vec2-base size by default, --tiny for the 2-layer test model); a client sends espeak-ng
speech as 16 kHz int16 packets paced in real time (--packet-ms) and records when each
response arrives. Each response carries audio_received_s, the audio the server had when it
produced it; its latency is the arrival time minus the time the packet completing that audio
was sent. Reports the interim and final latencies (median, p90, max), per packet the wait until a
result covering its audio arrived, and the time from the first packet to the first text.

    PYTHONPATH=service:tests:clients/python python bench/asr/bench_wav2vec2_streaming.py --seconds 20
"""
from __future__ import annotations

import argparse
import bisect
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "service"), str(ROOT / "tests"), str(ROOT / "clients" / "python"), str(Path(__file__).parent),
               str(ROOT / "bench")]


def stream_latency(address_channel, model: str, audio, *, packet_ms: float, interim_s: float,
                   chunk_s: float | None, paced: bool = True) -> dict:
    """Streams `audio` (float32 16 kHz numpy) and returns the latency statistics."""
    import numpy as np
    from pipeserve.v1 import common_pb2, speech_recognition_pb2 as pb, speech_recognition_pb2_grpc as pbg

    stub = pbg.SpeechRecognitionServiceStub(address_channel)
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    step = int(16000 * packet_ms / 1000) * 2
    sent: list[tuple[float, float]] = []  # (audio seconds sent so far, send time)
    options = pb.TranscriptionOptions(return_timestamps=pb.TIMESTAMP_GRANULARITY_WORD)
    if chunk_s:
        options.chunk_length_s = chunk_s

    def requests():
        yield pb.StreamingTranscribeRequest(config=pb.StreamingConfig(
            model=model, options=options, format=common_pb2.SAMPLE_FORMAT_INT16_LE, sample_rate=16000,
            channels=1, interim_interval_s=interim_s))
        start = time.perf_counter()
        for k in range(0, len(pcm), step):
            if paced:  # real time: packet k leaves when its audio would have been recorded
                delay = start + (k / 2 / 16000) - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            packet = pcm[k:k + step]
            sent.append(((k + len(packet)) / 2 / 16000, time.perf_counter()))
            yield pb.StreamingTranscribeRequest(audio=pb.AudioChunk(samples=packet))

    interim, final, first_text, done_text = [], [], None, ""
    covered: list[tuple[float, float]] = []  # (audio seconds a response covers, arrival time)
    t0 = None
    for response in stub.StreamingTranscribe(requests(), timeout=600):
        now = time.perf_counter()
        t0 = t0 or sent[0][1]
        if response.HasField("done"):
            done_text = response.done.transcription.text
            continue
        received = response.audio_received_s
        # the packet that brought the server's audio to `received`
        i = min(bisect.bisect_left([s for s, _ in sent], received - 1e-6), len(sent) - 1)
        latency = now - sent[i][1]
        (final if response.segment.is_final else interim).append(latency)
        covered.append((received, now))
        if first_text is None and response.segment.text.strip():
            first_text = now - t0
    # Per packet: how long after it was sent did the first result covering its audio arrive
    # (what a user waits for text to move past a given moment of speech).
    waits = []
    for audio_s, send_time in sent:
        arrival = next((t for s, t in covered if s >= audio_s - 1e-6), None)
        if arrival is not None:
            waits.append(arrival - send_time)
    return {"interim": _stats(interim), "final": _stats(final), "packet_to_text": _stats(waits),
            "first_text_s": first_text,
            "text": done_text}


def _stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    return {"n": len(values), "median_s": statistics.median(ordered),
            "p90_s": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], "max_s": ordered[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--packet-ms", type=float, default=100.0)
    parser.add_argument("--interim-s", type=float, default=0.5)
    parser.add_argument("--chunk-s", type=float, default=None, help="chunk_length_s of the stream (server default if unset)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="the 2-layer test model instead of base size")
    args = parser.parse_args()

    from pipeserve.serving.openmp_defaults import apply_openmp_defaults

    apply_openmp_defaults()  # as the server does, before torch loads
    import numpy as np
    import torch

    from bench_env import environment, print_environment

    torch.set_num_threads(args.threads)
    env = environment()
    print_environment(env)
    from bench_wav2vec2 import make_audio, make_checkpoint
    from grpc_testing import load_model, make_server

    work = Path(tempfile.mkdtemp(prefix="bench-w2v-stream-"))
    if args.tiny:
        import wav2vec2_checkpoints as ck
        ck.build("base", work / "ckpt")
    else:
        make_checkpoint(work / "ckpt")
    make_audio(work / "audio.f32", args.seconds)
    audio = np.fromfile(work / "audio.f32", dtype=np.float32)
    handle = make_server()
    try:
        load_model(handle, work / "ckpt")
        result = stream_latency(handle.channel, str(work / "ckpt"), audio, packet_ms=args.packet_ms,
                                interim_s=args.interim_s, chunk_s=args.chunk_s)
    finally:
        handle.stop()
    result.pop("text")
    result["environment"] = env
    print(f"wav2vec2 {'tiny' if args.tiny else 'base-size'} (random weights), {args.seconds:.0f} s speech paced in real "
          f"time, {args.packet_ms:.0f} ms packets, interim every {args.interim_s} s, {args.threads} threads, CPU")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
