"""Speech recognition end to end through gRPC with the embedded Whisper tiny.en (CTranslate2
layout): Transcribe and its word timestamps equal transformers' answer on the same weights
(an oracle built from the tests' own reading of the CTranslate2 file); TranscribeStream and
StreamingTranscribe agree with the in-process pipeline; bad audio and bad options get specific statuses and the server keeps serving."""
from __future__ import annotations

import io
import shutil
import struct
import threading
import time

import grpc
import numpy as np
import pytest
import soundfile as sf

import whisper_checkpoints as wc
from grpc_testing import error_reason, load_model, make_server

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
LIMIT_S = 3600.0


@pytest.fixture(scope="module")
def server():
    handle = make_server(max_audio_seconds=LIMIT_S)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def model(server):
    from pipeserve.checkpoints.embedded import embedded_model_dir

    info = load_model(server, embedded_model_dir("automatic-speech-recognition"))
    return info.name


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    text = " ".join(wc.SENTENCES[:3])
    return wc.speak(text, tmp_path_factory.mktemp("grpc_asr") / "s.wav"), text


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """transformers' ASR pipeline on the same weights (whisper_checkpoints.hf_from_ct2)."""
    from pipeserve.checkpoints.embedded import embedded_model_dir

    return wc.hf_pipeline(wc.hf_from_ct2(embedded_model_dir("automatic-speech-recognition"),
                                         tmp_path_factory.mktemp("oracle") / "tiny_en"))


def _oracle(oracle, wav: bytes, **kwargs) -> dict:
    from pipeserve.inputs.audio import load_audio_input

    return oracle(load_audio_input(data=wav).numpy().copy(), generate_kwargs={"num_beams": 1}, **kwargs)


def _stub(server):
    from pipeserve.v1 import speech_recognition_pb2_grpc

    return speech_recognition_pb2_grpc.SpeechRecognitionServiceStub(server.channel)


def _request(model, *, data=None, raw=None, **options):
    from pipeserve.v1 import common_pb2, speech_recognition_pb2 as pb

    audio = common_pb2.AudioInput(data=data) if data is not None else common_pb2.AudioInput(raw=raw)
    return pb.TranscribeRequest(model=model, request_id="r1", audio=audio, options=pb.TranscriptionOptions(**options))


def _local(wav: bytes, **options):
    from harness import load_pipeline
    from pipeserve.inputs.audio import load_audio_input
    from pipeserve.checkpoints.embedded import embedded_model_dir

    pipe = load_pipeline(embedded_model_dir("automatic-speech-recognition"))
    return pipe.transcribe([load_audio_input(data=wav)], options)[0]


def test_transcribe_and_stream_match_the_pipeline(server, model, speech, oracle):
    from pipeserve.v1 import speech_recognition_pb2 as pb

    wav, text = speech
    stub = _stub(server)
    response = stub.Transcribe(_request(model, data=wav), timeout=300)
    local = _local(wav)
    assert response.request_id == "r1"
    reference = _oracle(oracle, wav, return_timestamps=True)
    assert response.transcription.text == reference["text"] == local.text
    assert [(s.text, (s.start_s, s.end_s)) for s in response.transcription.segments] == \
        [(c["text"], tuple(c["timestamp"])) for c in reference["chunks"] if c["text"].strip()]
    assert [(s.start_s, s.end_s, s.text) for s in response.transcription.segments] == \
        [(s.start_s, s.end_s, s.text) for s in local.segments]
    assert response.transcription.language == "en" and response.transcription.duration_s > 10
    assert response.run.model == model

    messages = list(stub.TranscribeStream(pb.TranscribeStreamRequest(
        model=model, audio=_request(model, data=wav).audio), timeout=300))
    segments = [m.segment for m in messages if m.WhichOneof("event") == "segment"]
    assert messages[-1].WhichOneof("event") == "done" and len(segments) == len(messages) - 1
    assert "".join(s.text for s in segments) == messages[-1].done.transcription.text == local.text
    assert all(s.is_final for s in segments) and len({s.id for s in segments}) == len(segments)


def test_segment_without_a_start_is_sent_from_the_earliest_time_it_can_start():
    # The pipeline mirrors transformers' (None, None) chunk with start_s None; v1's start_s is a
    # required double, so the wire carries the end of the segment before it, not 0.0.
    from pipeserve.api.speech_recognition import _segment
    from pipeserve.pipelines.asr_types import Segment

    open_ = _segment(Segment(id="1", start_s=None, end_s=None, text=" more", earliest_start_s=8.22))
    assert open_.start_s == 8.22 and not open_.HasField("end_s")
    closed = _segment(Segment(id="0", start_s=0.18, end_s=8.22, text=" first"))
    assert (closed.start_s, closed.end_s) == (0.18, 8.22)


def test_word_timestamps_and_raw_pcm(server, model, speech, oracle):
    from pipeserve.v1 import common_pb2, speech_recognition_pb2 as pb

    wav, _ = speech
    samples, rate = sf.read(io.BytesIO(wav), dtype="int16")
    raw = common_pb2.RawAudio(samples=samples.astype("<i2").tobytes(), format=common_pb2.SAMPLE_FORMAT_INT16_LE,
                              sample_rate=rate, channels=1)
    response = _stub(server).Transcribe(_request(model, raw=raw, return_timestamps=pb.TIMESTAMP_GRANULARITY_WORD),
                                        timeout=300)
    words = [(w.text, (w.start_s, w.end_s)) for s in response.transcription.segments for w in s.words]
    assert len(words) > 10
    reference = _oracle(oracle, wav, return_timestamps="word")
    assert [w for w, _ in words] == [c["text"] for c in reference["chunks"]]
    for (word, (start, end)), chunk in zip(words, reference["chunks"], strict=True):
        assert (start, end) == pytest.approx(tuple(chunk["timestamp"]), abs=1e-6), word


def _live(model, wav: bytes, chunk_s: float = 0.5, interim_s: float = 2.0):
    from pipeserve.v1 import common_pb2, speech_recognition_pb2 as pb

    samples, rate = sf.read(io.BytesIO(wav), dtype="int16")
    yield pb.StreamingTranscribeRequest(config=pb.StreamingConfig(
        model=model, request_id="live", format=common_pb2.SAMPLE_FORMAT_INT16_LE, sample_rate=rate, channels=1,
        interim_interval_s=interim_s))
    step = int(chunk_s * rate)
    for start in range(0, len(samples), step):
        yield pb.StreamingTranscribeRequest(audio=pb.AudioChunk(samples=samples[start:start + step].astype("<i2").tobytes()))


def test_streaming_transcribe_interim_then_final(server, model, speech):
    wav, text = speech
    messages = list(_stub(server).StreamingTranscribe(_live(model, wav), timeout=300))
    done = messages[-1]
    assert done.WhichOneof("event") == "done" and done.request_id == "live"
    segments = [m.segment for m in messages[:-1]]
    assert any(not s.is_final for s in segments), "interim results arrive while audio streams"
    finals = [s for s in segments if s.is_final]
    assert [s.text for s in finals] == [s.text for s in done.done.transcription.segments]
    assert len({s.id for s in finals}) == len(finals)
    assert wc.wer(text, done.done.transcription.text) < 0.4, done.done.transcription.text
    assert done.audio_received_s == pytest.approx(done.done.transcription.duration_s, abs=0.01)
    received = [m.audio_received_s for m in messages]
    assert received == sorted(received)


def _wav(samples: np.ndarray, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["short", "silence", "noise"])
def test_degenerate_audio_gives_a_sensible_result(server, model, kind):
    rng = np.random.default_rng(0)
    audio = {"short": rng.standard_normal(1600) * 0.1, "silence": np.zeros(16000 * 3),
             "noise": rng.standard_normal(16000 * 3) * 0.3}[kind]
    response = _stub(server).Transcribe(_request(model, data=_wav(audio.astype(np.float32))), timeout=300)
    assert response.transcription.duration_s == pytest.approx(len(audio) / 16000)
    assert len(response.transcription.text) < 200


def _three_hour_flac() -> bytes:
    """Three hours of 8 kHz silence as FLAC (about 270 kB): small on the wire, long in time."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", 8000, 1, format="FLAC", subtype="PCM_16") as f:
        minute = np.zeros(8000 * 60, np.int16)
        for _ in range(180):
            f.write(minute)
    return buf.getvalue()


def _raw(samples: bytes, rate=16000, fmt=1, channels=1):
    from pipeserve.v1 import common_pb2

    return common_pb2.RawAudio(samples=samples, format=fmt, sample_rate=rate, channels=channels)


@pytest.mark.parametrize("case,reason", [
    ("empty", "INVALID_INPUT"),
    ("corrupt", "UNSUPPORTED_FORMAT"),
    ("not_audio", "UNSUPPORTED_FORMAT"),
    ("truncated", "INVALID_INPUT"),
    ("rate_zero", "INVALID_INPUT"),
    ("nan", "INVALID_INPUT"),
    ("inf", "INVALID_INPUT"),
    ("three_hours", "INPUT_TOO_LARGE"),
    ("no_format", "INVALID_INPUT"),
    ("char_timestamps", "INVALID_PARAMETER"),
    ("french_on_english_model", "INVALID_PARAMETER"),
    ("chunk_too_long", "INVALID_PARAMETER"),
])
def test_bad_requests_get_specific_errors_and_server_keeps_serving(server, model, speech, case, reason):
    from pipeserve.v1 import speech_recognition_pb2 as pb

    flac = io.BytesIO()
    sf.write(flac, np.zeros(16000, np.float32), 16000, format="FLAC")
    requests = {
        "empty": lambda: _request(model, data=b""),
        "corrupt": lambda: _request(model, data=bytes(range(256)) * 20),
        "not_audio": lambda: _request(model, data=b"\x89PNG\r\n\x1a\n" + b"\0" * 400),
        "truncated": lambda: _request(model, data=flac.getvalue()[:120]),
        "rate_zero": lambda: _request(model, raw=_raw(b"\0" * 3200, rate=0)),
        "nan": lambda: _request(model, raw=_raw(np.array([0.1, np.nan] * 800, "<f4").tobytes())),
        "inf": lambda: _request(model, raw=_raw(np.array([np.inf] * 1600, "<f4").tobytes())),
        "three_hours": lambda: _request(model, data=_three_hour_flac()),
        "no_format": lambda: _request(model, raw=_raw(b"\0" * 3200, fmt=0)),
        "char_timestamps": lambda: _request(model, data=speech[0], return_timestamps=pb.TIMESTAMP_GRANULARITY_CHAR),
        "french_on_english_model": lambda: _request(model, data=speech[0], language="fr"),
        "chunk_too_long": lambda: _request(model, data=speech[0], chunk_length_s=45.0),
    }
    stub = _stub(server)
    with pytest.raises(grpc.RpcError) as info:
        stub.Transcribe(requests[case](), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert error_reason(info.value) == reason, info.value.details()
    assert info.value.details()
    ok = stub.Transcribe(_request(model, raw=_raw(np.zeros(8000, "<f4").tobytes())), timeout=120)
    assert ok.request_id == "r1"


def test_stream_that_never_half_closes_hits_its_deadline(server, model, speech):
    from pipeserve.v1 import common_pb2, speech_recognition_pb2 as pb

    release = threading.Event()

    def requests():
        yield pb.StreamingTranscribeRequest(config=pb.StreamingConfig(
            model=model, format=common_pb2.SAMPLE_FORMAT_FLOAT32_LE, sample_rate=16000, channels=1))
        yield pb.StreamingTranscribeRequest(audio=pb.AudioChunk(samples=np.zeros(1600, "<f4").tobytes()))
        release.wait(30)  # never half-closes within the deadline

    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        list(_stub(server).StreamingTranscribe(requests(), timeout=3))
    release.set()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 20
    assert _stub(server).Transcribe(_request(model, data=speech[0]), timeout=300).transcription.text


@pytest.mark.parametrize("case,reason", [
    ("chunk_too_large", "INPUT_TOO_LARGE"),
    ("audio_first", "INVALID_INPUT"),
    ("second_config", "INVALID_INPUT"),
    ("rate_zero", "INVALID_INPUT"),
    ("partial_frame", "INVALID_INPUT"),
    ("nan", "INVALID_INPUT"),
])
def test_bad_live_streams(server, model, case, reason):
    from pipeserve.v1 import common_pb2, speech_recognition_pb2 as pb

    config = pb.StreamingTranscribeRequest(config=pb.StreamingConfig(
        model=model, format=common_pb2.SAMPLE_FORMAT_FLOAT32_LE, sample_rate=0 if case == "rate_zero" else 16000,
        channels=1))
    chunk = lambda samples: pb.StreamingTranscribeRequest(audio=pb.AudioChunk(samples=samples))
    messages = {
        "chunk_too_large": [config, chunk(np.zeros(16000 * 31, "<f4").tobytes())],
        "audio_first": [chunk(b"\0" * 64)],
        "second_config": [config, config],
        "rate_zero": [config, chunk(b"\0" * 64)],
        "partial_frame": [config, chunk(b"\0" * 7)],
        "nan": [config, chunk(np.array([np.nan] * 16, "<f4").tobytes())],
    }[case]
    with pytest.raises(grpc.RpcError) as info:
        list(_stub(server).StreamingTranscribe(iter(messages), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert error_reason(info.value) == reason, info.value.details()


def test_deadline_stops_a_long_transcription(server, model, speech, tmp_path):
    """A deadline far shorter than the work: DEADLINE_EXCEEDED, decoding stops (the next call
    is not stuck behind it) and the server keeps serving."""
    from pipeserve.inputs.audio import load_audio_input

    one = load_audio_input(data=speech[0]).numpy()
    long_audio = np.tile(one, 12)  # about 2.5 minutes
    raw = _raw(long_audio.astype("<f4").tobytes())
    stub = _stub(server)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.Transcribe(_request(model, raw=raw, num_beams=4), timeout=1.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    short = time.monotonic()
    assert stub.Transcribe(_request(model, data=speech[0]), timeout=120).transcription.text
    # The abandoned request stopped at its next decoding step instead of finishing its minutes of audio.
    assert time.monotonic() - short < 30
    assert time.monotonic() - started < 40
