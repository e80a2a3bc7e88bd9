"""Client behaviour under failure, against a scripted server (tests/client_fakes.py) that
speaks the real contracts and error encoding: retries only on the codes common.proto calls
retryable, with backoff honouring retry_after_ms; deadlines bound the whole retry sequence;
streams retry only before their first message and report a break after it; TLS, mutual TLS
and bearer tokens; both the sync and asyncio clients."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from client_fakes import TLS_DIR, FakeServer
from pipeserve_client import (NO_RETRY, AsyncClient, Client, DeadlineExceededError, InputError, InputFileError,
                              InternalError, InvalidArgumentError, ResourceExhaustedError, RetryPolicy,
                              StreamInterruptedError, UnauthenticatedError, UnavailableError)

FAST = RetryPolicy(max_attempts=5, initial_backoff_s=0.01, max_backoff_s=0.05)


@pytest.fixture
def fake():
    server = FakeServer()
    yield server
    server.stop()


def test_unavailable_and_queue_full_are_retried(fake):
    fake.plan = ["unavailable", "queue_full", "unavailable"]
    with Client(fake.address, retry=FAST, timeout=10) as client:
        started = time.monotonic()
        assert [m.name for m in client.models.list()] == ["fake-model"]
        elapsed = time.monotonic() - started
    assert fake.calls["ListModels"] == 4
    assert elapsed >= 0.05, "QUEUE_FULL's retry_after_ms=50 must be honoured"


@pytest.mark.parametrize("outcome, error, reason", [
    ("oom", ResourceExhaustedError, "OUT_OF_MEMORY"),
    ("invalid", InvalidArgumentError, "INVALID_PARAMETER"),
    ("internal", InternalError, "INTERNAL_ERROR"),
])
def test_other_failures_are_not_retried(fake, outcome, error, reason):
    fake.plan = [outcome]
    with Client(fake.address, retry=FAST, timeout=10) as client:
        with pytest.raises(error) as info:
            client.models.list()
    assert fake.calls["ListModels"] == 1
    assert info.value.reason == reason and not info.value.retryable
    if outcome == "invalid":
        assert info.value.metadata == {"field": "top_k"}
        assert "top_k must be at least 1" in str(info.value)


def test_retries_stop_after_max_attempts(fake):
    fake.plan = ["unavailable"] * 10
    with Client(fake.address, retry=FAST, timeout=10) as client:
        with pytest.raises(UnavailableError) as info:
            client.models.list()
    assert fake.calls["ListModels"] == FAST.max_attempts
    assert info.value.retryable
    fake.plan = ["draining"]
    with Client(fake.address, retry=NO_RETRY) as client:
        with pytest.raises(UnavailableError) as info:
            client.models.list()
    assert info.value.reason == "DRAINING" and fake.calls["ListModels"] == FAST.max_attempts + 1


def test_deadline_bounds_a_slow_call_and_the_retry_sequence(fake):
    fake.plan = ["slow"]
    with Client(fake.address, retry=FAST) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            client.models.list(timeout=0.3)
        assert time.monotonic() - started < 1.5
    # Endless QUEUE_FULL with a long retry_after hint: the deadline, not max_attempts, ends it.
    fake.plan = ["queue_full"] * 50
    patient = RetryPolicy(max_attempts=50, initial_backoff_s=0.2, max_backoff_s=0.2)
    with Client(fake.address, retry=patient, timeout=0.5) as client:
        started = time.monotonic()
        with pytest.raises(ResourceExhaustedError) as info:
            client.models.list()
        assert time.monotonic() - started < 1.0
    assert info.value.reason == "QUEUE_FULL" and fake.calls["ListModels"] < 10


def test_a_retry_is_made_only_with_time_left_for_it(fake, monkeypatch):
    """Out of time, a call fails with the error that made it retry, never with a
    DEADLINE_EXCEEDED from an attempt started with a few milliseconds left."""
    fake.plan = ["queue_full"]  # retry_after_ms=50: the wait would leave 30 ms of an 80 ms deadline
    quick = RetryPolicy(max_attempts=5, initial_backoff_s=0.001, max_backoff_s=0.001, min_attempt_s=0.05)
    with Client(fake.address, retry=quick, timeout=0.08) as client:
        with pytest.raises(ResourceExhaustedError) as info:
            client.models.list()
    assert info.value.reason == "QUEUE_FULL" and fake.calls["ListModels"] == 1
    # The wait itself overruns (a busy machine): checked again after it, no doomed attempt.
    fake.plan = ["queue_full"]
    real_sleep = time.sleep
    monkeypatch.setattr("pipeserve_client._calls.time.sleep", lambda s: real_sleep(s + 0.5))
    with Client(fake.address, retry=quick, timeout=0.4) as client:
        with pytest.raises(ResourceExhaustedError) as info:
            client.models.list()
    assert info.value.reason == "QUEUE_FULL" and fake.calls["ListModels"] == 2


def test_backoff_is_jittered_exponential_and_honours_the_hint():
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=2.0)
    for retry, cap in [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (6, 1.0)]:
        delays = [policy.backoff_s(retry) for _ in range(200)]
        assert all(0.0 <= d <= cap for d in delays)
        assert max(delays) > cap * 0.5 and min(delays) < cap * 0.5, "full jitter spreads the delays"
    hinted = UnavailableError("x", metadata={"retry_after_ms": "300"})
    assert all(policy.backoff_s(0, hinted) >= 0.3 for _ in range(50))


def test_stream_retries_only_before_the_first_message(fake):
    fake.stream_plan = ["fail_before", "ok"]
    with Client(fake.address, retry=FAST, timeout=10) as client:
        texts = [m.token.text for m in client.generate("x", stream=True) if m.HasField("token")]
    assert texts == ["Once", " upon", " a", " time"] and fake.calls["GenerateStream"] == 2

    fake.stream_plan = ["fail_after"]
    received = []
    with Client(fake.address, retry=FAST, timeout=10) as client:
        with pytest.raises(StreamInterruptedError) as info:
            for message in client.generate("x", stream=True):
                received.append(message.token.text)
    assert received == ["Once", " upon"] and info.value.received == 2
    assert fake.calls["GenerateStream"] == 3, "a stream that delivered messages is never replayed"


def test_closing_a_stream_early_cancels_the_call(fake):
    fake.stream_plan = ["slow"]
    with Client(fake.address, timeout=10) as client:
        stream = client.generate("x", stream=True)
        assert next(stream).token.text == "Once"
        stream.close()
    assert fake.cancelled.wait(5), "the server saw the cancellation"


def test_async_client_retries_and_reports_broken_streams(fake):
    fake.plan = ["unavailable", "queue_full"]
    fake.stream_plan = ["fail_before", "fail_after"]

    async def scenario():
        async with AsyncClient(fake.address, retry=FAST, timeout=10) as client:
            models = await client.models.list()
            received = []
            with pytest.raises(StreamInterruptedError) as info:
                async for message in await client.generate("x", stream=True):
                    received.append(message.token.text)
            fake.plan = ["slow"]
            with pytest.raises(DeadlineExceededError):
                await client.models.list(timeout=0.3)
            return models, received, info.value

    models, received, error = asyncio.run(scenario())
    assert [m.name for m in models] == ["fake-model"] and fake.calls["ListModels"] == 4
    assert received == ["Once", " upon"] and error.received == 2


def test_unreachable_server_is_unavailable_quickly():
    with Client("127.0.0.1:1", retry=FAST, timeout=5) as client:
        started = time.monotonic()
        with pytest.raises(UnavailableError) as info:
            client.models.list()
        assert time.monotonic() - started < 3
        with pytest.raises(UnavailableError, match="cannot reach"):
            client.wait_ready(0.2)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_bearer_token(fake):
    fake.token = "s3cret"
    with Client(fake.address, token="s3cret", timeout=5) as client:
        assert client.models.list()
    with Client(fake.address, token="wrong", timeout=5) as client:
        with pytest.raises(UnauthenticatedError):
            client.models.list()
    with Client(fake.address, timeout=5) as client:
        with pytest.raises(UnauthenticatedError):
            client.models.list()


def test_tls_and_mutual_tls():
    ca, other = TLS_DIR / "ca.pem", TLS_DIR / "other_ca.pem"
    cert, key = TLS_DIR / "client.pem", TLS_DIR / "client.key"
    tls = FakeServer(tls="tls", token="t")
    mtls = FakeServer(tls="mtls")
    try:
        with Client(tls.address, root_certificates=str(ca), token="t", timeout=5) as client:
            assert client.models.list()
        with Client(f"127.0.0.1:{tls.port}", root_certificates=ca.read_bytes(), token="t", timeout=5) as client:
            assert client.models.list()  # the certificate names 127.0.0.1 too
        with Client(tls.address, root_certificates=str(other), retry=NO_RETRY, timeout=5) as client:
            with pytest.raises(UnavailableError):  # a CA that did not sign the server's certificate
                client.models.list()
        with Client(tls.address, retry=NO_RETRY, timeout=5) as client:  # plaintext to a TLS server
            with pytest.raises(UnavailableError):
                client.models.list()
        with Client(mtls.address, root_certificates=str(ca), client_certificate=str(cert), client_key=str(key),
                    timeout=5) as client:
            assert client.models.list()
        with Client(mtls.address, root_certificates=str(ca), retry=NO_RETRY, timeout=5) as client:
            with pytest.raises(UnavailableError):  # the server requires a client certificate
                client.models.list()

        async def async_mtls():
            async with AsyncClient(mtls.address, root_certificates=str(ca), client_certificate=str(cert),
                                   client_key=str(key), timeout=5) as client:
                return await client.models.list()

        assert asyncio.run(async_mtls())
    finally:
        tls.stop()
        mtls.stop()


def test_tls_settings_are_checked_before_connecting(tmp_path):
    with pytest.raises(InputFileError, match="TLS root certificate file not found"):
        Client("localhost:1", root_certificates=str(tmp_path / "missing.pem"))
    with pytest.raises(InputError, match="both a client certificate and its key"):
        Client("localhost:1", root_certificates=str(TLS_DIR / "ca.pem"),
               client_certificate=str(TLS_DIR / "client.pem"))
    with pytest.raises(InputError, match="tls=False"):
        Client("localhost:1", tls=False, root_certificates=str(TLS_DIR / "ca.pem"))


def test_audio_inputs_are_encoded_as_the_contract_says(fake, tmp_path):
    """What the client sends for each audio input kind, as the server receives it."""
    import numpy as np

    from pipeserve.v1 import common_pb2

    stereo = np.stack([np.linspace(-1, 1, 8, dtype=np.float64), np.zeros(8)], axis=1)  # (frames, channels)
    path = tmp_path / "clip.wav"
    path.write_bytes(b"RIFF....WAVEfmt ")
    with Client(fake.address, timeout=10) as client:
        client.transcribe(stereo, sampling_rate=22050, return_timestamps="word", chunk_length_s=30,
                          temperature=(0.0, 0.2, 0.4), request_id="r1")
        client.transcribe({"raw": np.array([0, 1000, -1000], dtype=np.int16), "sampling_rate": 8000})
        client.transcribe(path, return_timestamps=True)
        client.transcribe("https://example.com/a.wav", return_timestamps=False)
        texts = [m.segment.text for m in client.transcribe(path.read_bytes(), stream=True) if m.HasField("segment")]
        with pytest.raises(InputError, match="sampling_rate"):
            client.transcribe(np.zeros(10, dtype=np.float32))
        with pytest.raises(InputError, match="float"):
            client.transcribe(np.zeros(10, dtype=np.int64), sampling_rate=16000)
        with pytest.raises(InputError, match="return_timestamps must be one of"):
            client.transcribe(path, return_timestamps="paragraph")
        with pytest.raises(TypeError, match="unexpected keyword argument.*chunk_len"):
            client.transcribe(path, chunk_len=3)  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="unexpected keyword argument.*max_tokens"):
            client.generate("x", max_tokens=3)  # type: ignore[call-arg]
    first, second, third, fourth, _ = fake.requests
    raw = first.audio.raw
    assert (raw.format, raw.sample_rate, raw.channels) == (common_pb2.SAMPLE_FORMAT_FLOAT32_LE, 22050, 2)
    assert np.array_equal(np.frombuffer(raw.samples, "<f4"), stereo.astype(np.float32).reshape(-1))  # interleaved
    options = first.options
    assert options.return_timestamps == 3 and options.chunk_length_s == 30  # TIMESTAMP_GRANULARITY_WORD
    assert options.temperature == 0.0 and list(options.temperature_fallback) == pytest.approx([0.2, 0.4])
    assert first.request_id == "r1" and not options.HasField("language")
    assert second.audio.raw.format == common_pb2.SAMPLE_FORMAT_INT16_LE and second.audio.raw.sample_rate == 8000
    assert np.array_equal(np.frombuffer(second.audio.raw.samples, "<i2"), [0, 1000, -1000])
    assert third.audio.data == path.read_bytes() and third.options.return_timestamps == 2  # SEGMENT
    assert fourth.audio.uri == "https://example.com/a.wav" and fourth.options.return_timestamps == 1  # NONE
    assert texts == [" part 0", " par", " part 1", " part 2"]


def test_live_transcription_sends_config_then_chunks(fake):
    """transcribe_live (bidirectional): the config goes first with the chunks' format, then
    one AudioChunk per captured buffer; responses stream back as audio arrives."""
    import numpy as np

    from pipeserve.v1 import common_pb2

    chunks = [np.full(1600, 0.1 * i, dtype=np.float32) for i in range(4)]  # 4 x 0.1 s at 16 kHz
    with Client(fake.address, timeout=10) as client:
        messages = list(client.transcribe_live(iter(chunks), sampling_rate=16000, language="en",
                                               interim_interval_s=0.5, request_id="live"))
    config, *audio = fake.requests
    assert config.HasField("config") and config.config.format == common_pb2.SAMPLE_FORMAT_FLOAT32_LE
    assert (config.config.sample_rate, config.config.channels, config.config.request_id) == (16000, 1, "live")
    assert config.config.options.language == "en" and config.config.interim_interval_s == pytest.approx(0.5)
    assert [np.frombuffer(m.audio.samples, "<f4")[0] for m in audio] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert [m.segment.is_final for m in messages[:-1]] == [False, True, False, True]
    assert messages[-1].done.transcription.duration_s == pytest.approx(0.4)

    fake.requests.clear()

    async def live_async():
        async with AsyncClient(fake.address, timeout=10) as client:
            ints = [np.zeros(800, dtype=np.int16)] * 2
            return [m async for m in client.transcribe_live(ints, sampling_rate=8000)]

    replies = asyncio.run(live_async())
    assert fake.requests[0].config.format == common_pb2.SAMPLE_FORMAT_INT16_LE
    assert replies[-1].done.transcription.duration_s == pytest.approx(0.2)
