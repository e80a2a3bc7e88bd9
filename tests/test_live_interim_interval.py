"""StreamingTranscribe's interim_interval_s is honoured: a live stream decodes an interim
result every interval of audio while a decode costs at most half of it, lengthens the interval
to twice the decode's cost where it costs more (so a slow machine keeps up with real time),
and the server reports the interval it applies on the stream's first response and whenever
it changes. The pipeline tests drive the streams with a clock that makes every decode cost a
chosen time, so they do not depend on the machine's speed."""
from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch

import wav2vec2_checkpoints as ck
import whisper_checkpoints as wc
from grpc_testing import load_model
from harness import load_pipeline


def _fixed_cost_clock(cost_s: float):
    """perf_counter stand-in: each call advances by cost_s, so start/stop pairs measure cost_s."""
    ticks = itertools.count()
    return lambda: next(ticks) * cost_s


def _interim_decodes(live, seconds: float, packet_s: float = 0.1) -> list[float]:
    """Pushes `seconds` of audio in packets; returns the audio received (s) at each decode."""
    at: list[float] = []
    decode = live._decode if hasattr(live, "_decode") and hasattr(live, "finals") else live._interim

    def counting(*args, **kwargs):
        at.append(round(live.audio_received_s, 3))
        return decode(*args, **kwargs)

    if hasattr(live, "finals"):
        live._decode = counting
    else:
        live._interim = counting
    audio = torch.from_numpy(ck.audio(seconds, seed=5))
    step = int(packet_s * 16000)
    for k in range(0, audio.shape[0], step):
        live.push(audio[k:k + step])
    return at


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    return load_pipeline(wc.build(tmp_path_factory.mktemp("whisper-live") / "en", multilingual=False))


def test_whisper_interims_follow_the_requested_interval(whisper):
    live = whisper.open_stream({"interim_interval_s": 0.5, "max_new_tokens": 4})
    live.clock = _fixed_cost_clock(0.1)  # cheap decodes: the requested interval holds
    assert _interim_decodes(live, 3.0) == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert live.interim_interval_s == 0.5


def test_whisper_interval_lengthens_to_twice_the_decode_cost_and_is_remembered(whisper):
    live = whisper.open_stream({"interim_interval_s": 0.5, "max_new_tokens": 4})
    live.clock = _fixed_cost_clock(0.4)  # 0.4 s a decode: at most every 0.8 s of audio
    assert _interim_decodes(live, 3.0) == [0.5, 1.3, 2.1, 2.9]
    assert live.interim_interval_s == pytest.approx(0.8)
    # The next stream of this model starts from what decoding costs here.
    assert whisper.open_stream({"interim_interval_s": 0.5}).interim_interval_s == pytest.approx(0.8)
    assert whisper.open_stream({"interim_interval_s": 2.0}).interim_interval_s == 2.0


def test_ctc_interval_is_honoured_and_lengthened_the_same_way(tmp_path):
    directory, _ = ck.build("large", tmp_path)
    pipe = load_pipeline(directory)
    live = pipe.open_stream({"interim_interval_s": 0.3, "chunk_length_s": 2.0})
    live.clock = _fixed_cost_clock(0.05)
    assert _interim_decodes(live, 1.5) == [0.3, 0.6, 0.9, 1.2, 1.5]
    live = pipe.open_stream({"interim_interval_s": 0.3, "chunk_length_s": 2.0})
    live.clock = _fixed_cost_clock(0.25)
    assert _interim_decodes(live, 1.8) == [0.3, 0.8, 1.3, 1.8]
    assert live.interim_interval_s == pytest.approx(0.5)


def test_server_reports_the_interval_it_applies(grpc_server, tmp_path):
    from pipeserve.v1 import common_pb2, speech_recognition_pb2 as pb, speech_recognition_pb2_grpc as pb_grpc

    directory, _ = ck.build("large", tmp_path)
    load_model(grpc_server, directory)
    stub = pb_grpc.SpeechRecognitionServiceStub(grpc_server.channel)
    pcm = (np.clip(ck.audio(4.0, seed=6), -1, 1) * 32767).astype("<i2")

    def requests():
        yield pb.StreamingTranscribeRequest(config=pb.StreamingConfig(
            model=str(directory), options=pb.TranscriptionOptions(chunk_length_s=2.0),
            format=common_pb2.SAMPLE_FORMAT_INT16_LE, sample_rate=16000, channels=1, interim_interval_s=0.5))
        start = time.perf_counter()
        for k in range(0, len(pcm), 1600):  # 100 ms packets, sent at real time
            time.sleep(max(0.0, start + k / 16000 - time.perf_counter()))
            yield pb.StreamingTranscribeRequest(audio=pb.AudioChunk(samples=pcm[k:k + 1600].tobytes()))

    responses = list(stub.StreamingTranscribe(requests(), timeout=120))
    assert responses[0].HasField("interim_interval_s") and responses[0].interim_interval_s >= 0.5
    reported = [r.interim_interval_s for r in responses if r.HasField("interim_interval_s")]
    assert all(a != b for a, b in zip(reported, reported[1:]))  # sent only when it changes
    # Interims come no closer together than the interval in effect when they were decoded.
    interval, last = None, 0.0
    for r in responses:
        if r.HasField("interim_interval_s"):
            interval = r.interim_interval_s
        if r.HasField("segment") and not r.segment.is_final:
            assert r.audio_received_s - last >= min(interval, 0.5) - 1e-6
            last = r.audio_received_s
    assert responses[-1].HasField("done")
