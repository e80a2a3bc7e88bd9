"""The web demo's live microphone endpoint (/api/live, clients/web/live_session.py) without a
browser: a WebSocket client written here against the bridge, relaying to a scripted gRPC
servicer (to see what the bridge sends and when the call ends) and to the real server."""
from __future__ import annotations

import base64
import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from client_models import loader_fixture, require_servicer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "clients" / "web"))

import demo  # noqa: E402  (clients/web/demo.py)
import live_session  # noqa: E402
import rfc6455  # noqa: E402

loaded = loader_fixture()  # loaded(kind) -> model name


class LiveClient:
    """A WebSocket client: the opening handshake, masked frames out, frames in."""

    def __init__(self, port: int, query: str, origin: str | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        headers = [f"GET /api/live?{query} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
                   "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        if origin:
            headers.append(f"Origin: {origin}")
        self.sock.sendall(("\r\n".join(headers) + "\r\n\r\n").encode())
        response = b""
        while b"\r\n\r\n" not in response:
            data = self.sock.recv(1)
            assert data, "the bridge closed during the handshake"
            response += data
        self.status = int(response.split()[1])
        if self.status == 101:
            assert f"Sec-WebSocket-Accept: {rfc6455.accept_key(key)}".encode() in response
        self.frames = rfc6455.WebSocket(self.sock, max_message=1 << 24, require_mask=False, frame_timeout_s=60)

    def send_audio(self, samples: np.ndarray) -> None:
        self.send_raw(rfc6455.BINARY, samples.astype("<f4").tobytes())

    def send_raw(self, opcode: int, payload: bytes, mask: bytes | None = b"\x11\x22\x33\x44") -> None:
        self.sock.sendall(rfc6455.encode_frame(opcode, payload, mask))

    def stop(self) -> None:
        self.send_raw(rfc6455.TEXT, json.dumps({"type": "stop"}).encode())

    def events(self) -> tuple[list[tuple[str, dict]], int]:
        """Every event until the bridge closes, and its close code."""
        out = []
        while True:
            try:
                _, data = self.frames.receive()
            except rfc6455.Closed as closed:
                return out, closed.code
            message = json.loads(data)
            out.append((message["event"], message["data"]))

    def next_event(self) -> tuple[str, dict]:
        _, data = self.frames.receive()
        message = json.loads(data)
        return message["event"], message["data"]

    def close(self) -> None:
        self.sock.close()


class ScriptedSpeech:  # the other two RPCs are the generated base class's UNIMPLEMENTED
    """StreamingTranscribe that answers each chunk with an interim segment and every second
    chunk with a final one, and records how each call ended: "half-closed" (the client sent
    all its audio, and got "done") or "cancelled"."""

    def __init__(self) -> None:
        from pipeserve.v1 import speech_recognition_pb2_grpc as pb_grpc

        self.requests: list = []
        self.endings: list[str] = []
        self.ended = threading.Event()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handler = {"StreamingTranscribe": lambda _, requests, context: self.StreamingTranscribe(requests, context)}
        servicer = type("Servicer", (pb_grpc.SpeechRecognitionServiceServicer,), handler)
        pb_grpc.add_SpeechRecognitionServiceServicer_to_server(servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.address = f"127.0.0.1:{self.port}"

    def StreamingTranscribe(self, request_iterator, context):
        from pipeserve.v1 import speech_recognition_pb2 as pb

        # A cancelled call can end the request iterator as a half-close does, and leaves this
        # generator suspended where it was; what tells the two apart is whether "done" went
        # out: the call's end (this callback) comes after it only when nobody cancelled.
        done_sent = []

        def ended() -> None:
            self.endings.append("half-closed" if done_sent else "cancelled")
            self.ended.set()

        context.add_callback(ended)
        received_s, chunks, rate = 0.0, 0, 16000
        for message in request_iterator:
            self.requests.append(message)
            if message.HasField("config"):
                rate = message.config.sample_rate
                continue
            chunks += 1
            received_s += len(message.audio.samples) / 4 / rate
            yield pb.StreamingTranscribeResponse(audio_received_s=received_s, segment=pb.Segment(
                id=str(chunks // 2), text=f" interim {chunks}", is_final=False))
            if chunks % 2 == 0:
                yield pb.StreamingTranscribeResponse(audio_received_s=received_s, segment=pb.Segment(
                    id=str(chunks // 2 - 1), text=f" final {chunks // 2 - 1}", end_s=received_s, is_final=True))
        yield pb.StreamingTranscribeResponse(audio_received_s=received_s, done=pb.TranscriptionDone(
            transcription=pb.Transcription(text="all of it", duration_s=received_s)))
        done_sent.append(True)

    def stop(self) -> None:
        self.server.stop(None)


@pytest.fixture()
def scripted():
    speech = ScriptedSpeech()
    yield speech
    speech.stop()


def bridge(address: str, **limits) -> demo.DemoServer:
    server = demo.make_server(address, port=0, timeout=30, live_limits=live_session.LiveLimits(**limits))
    demo.serve_in_thread(server)
    return server


@pytest.fixture()
def scripted_bridge(scripted):
    server = bridge(scripted.address)
    yield server
    server.shutdown()
    server.server_close()
    server.client.close()


def _wait(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# --- the relay -------------------------------------------------------------------------------

def test_live_relays_chunks_in_and_segments_out(scripted, scripted_bridge):
    client = LiveClient(scripted_bridge.server_port, "rate=16000&timestamps=word&language=en&interim_interval_s=0.5")
    assert client.status == 101
    chunks = [np.full(1600, i / 10, np.float32) for i in range(4)]
    for chunk in chunks:
        client.send_audio(chunk)
    # Segments come back while the audio is still open (before "stop").
    name, segment = client.next_event()
    assert name == "segment" and (segment["id"], segment["text"], segment["audio_received_s"]) == \
        ("0", " interim 1", 0.1)
    assert segment["is_final"] is False and segment["start_s"] == 0.0  # to_dict keeps zero values
    client.stop()
    events, code = client.events()
    client.close()
    assert code == rfc6455.NORMAL
    assert [name for name, _ in events] == ["segment"] * 5 + ["done"]
    assert [(e["id"], e.get("is_final", False)) for _, e in events[:5]] == [
        ("1", False), ("0", True), ("1", False), ("2", False), ("1", True)]
    transcription = events[-1][1]["transcription"]
    assert (transcription["text"], transcription["duration_s"]) == ("all of it", 0.4)
    from pipeserve.v1 import common_pb2, speech_recognition_pb2 as pb

    config = scripted.requests[0].config
    assert (config.sample_rate, config.channels, config.format) == (16000, 1, common_pb2.SAMPLE_FORMAT_FLOAT32_LE)
    assert config.options.language == "en" and config.options.return_timestamps == pb.TIMESTAMP_GRANULARITY_WORD
    assert config.interim_interval_s == 0.5
    assert [m.audio.samples for m in scripted.requests[1:]] == [c.astype("<f4").tobytes() for c in chunks]
    assert scripted.endings == ["half-closed"]


def test_live_stop_before_any_audio_still_returns_a_transcription(scripted, scripted_bridge):
    client = LiveClient(scripted_bridge.server_port, "rate=16000")
    client.stop()
    events, code = client.events()
    client.close()
    assert code == rfc6455.NORMAL and events[-1][0] == "done"
    assert scripted.requests[0].HasField("config") and scripted.requests[1].audio.samples == b""


@pytest.mark.parametrize("ending", ["drop", "close frame"])
def test_the_page_leaving_cancels_the_grpc_call(scripted, ending):
    server = bridge(scripted.address, max_sessions=1)
    try:
        _leave_and_reopen(scripted, server.server_port, ending)
    finally:
        server.shutdown()
        server.server_close()
        server.client.close()


def _leave_and_reopen(scripted, port: int, ending: str) -> None:
    client = LiveClient(port, "rate=16000")
    client.send_audio(np.zeros(1600, np.float32))
    assert client.next_event()[0] == "segment"  # the call is open
    if ending == "close frame":
        client.send_raw(rfc6455.CLOSE, (1001).to_bytes(2, "big"))
    client.close()
    assert scripted.ended.wait(20), "the gRPC call was left open after the page went away"
    _wait(lambda: scripted.endings)
    assert scripted.endings == ["cancelled"]
    # The session's slot (the only one) is free again: a new session runs to "done".
    deadline = time.monotonic() + 20
    while True:
        again = LiveClient(port, "rate=16000")
        again.stop()
        events, _ = again.events()
        again.close()
        if events[-1][1].get("reason") != "TOO_MANY_STREAMS" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert events[-1][0] == "done"


def test_a_live_stream_is_cancelled_from_another_thread(scripted):
    """The client's BidiStream.cancel() ends a call another thread is waiting on (what the
    bridge does when the page leaves); a generator could not be closed while it waits."""
    from pipeserve_client import Client, PipeserveError

    release = threading.Event()

    def chunks():
        yield np.zeros(1600, np.float32)
        release.wait(30)  # the microphone stays open

    with Client(scripted.address, timeout=30) as client:
        stream = client.transcribe_live(chunks(), sampling_rate=16000)
        assert next(stream).segment.text == " interim 1"
        threading.Timer(0.2, stream.cancel).start()
        with pytest.raises(PipeserveError) as error:
            next(stream)
        release.set()
    assert error.value.code == grpc.StatusCode.CANCELLED
    assert scripted.ended.wait(20) and scripted.endings == ["cancelled"]


# --- bounds and bad messages -----------------------------------------------------------------

@pytest.mark.parametrize("query, message", [
    ("", "rate must be the sample rate"), ("rate=abc", "rate must be the sample rate"),
    ("rate=7999", "between 8000 and 192000"), ("rate=999999999999", "between 8000 and 192000"),
    ("rate=16000&timestamps=frames", "timestamps must be"),
    ("rate=16000&chunk_length_s=nan", "chunk_length_s must be a positive"),
    ("rate=16000&interim_interval_s=-1", "interim_interval_s must be a positive"),
])
def test_live_refuses_bad_parameters_before_calling(scripted, scripted_bridge, query, message):
    client = LiveClient(scripted_bridge.server_port, query)
    events, code = client.events()
    client.close()
    assert code == rfc6455.POLICY
    assert events == [("error", {"error": events[0][1]["error"], "code": "INVALID_ARGUMENT",
                                 "reason": "INVALID_PARAMETER"})]
    assert message in events[0][1]["error"]
    assert not scripted.requests


def _opened_and_refused(port: int, send) -> tuple[list, int]:
    client = LiveClient(port, "rate=16000")
    send(client)
    events, code = client.events()
    client.close()
    return events, code


def test_live_closes_on_bad_messages(scripted, scripted_bridge):
    port = scripted_bridge.server_port
    # Half a float32 sample.
    events, code = _opened_and_refused(port, lambda c: c.send_raw(rfc6455.BINARY, b"\0" * 6))
    assert code == rfc6455.UNSUPPORTED and events[-1][1]["reason"] == "INVALID_INPUT"
    # A text message other than stop.
    events, code = _opened_and_refused(port, lambda c: c.send_raw(rfc6455.TEXT, b'{"type": "pause"}'))
    assert code == rfc6455.POLICY and "stop" in events[-1][1]["error"]
    # A frame over the message limit (1 s of audio at the stream's rate), refused from its header.
    events, code = _opened_and_refused(port, lambda c: c.sock.sendall(
        bytes([0x82, 0xFF]) + (1 << 40).to_bytes(8, "big") + b"\1\2\3\4"))
    assert code == rfc6455.TOO_BIG
    events, code = _opened_and_refused(port, lambda c: c.send_audio(np.zeros(16001, np.float32)))
    assert code == rfc6455.TOO_BIG
    # Unmasked client frames, and text that is not UTF-8.
    events, code = _opened_and_refused(port, lambda c: c.send_raw(rfc6455.BINARY, b"\0" * 8, mask=None))
    assert code == rfc6455.PROTOCOL_ERROR
    events, code = _opened_and_refused(port, lambda c: c.send_raw(rfc6455.TEXT, b"\xff\xfe"))
    assert code == rfc6455.INVALID_DATA
    # None of those reached the server as audio, and every call that opened was cancelled.
    assert all(not m.HasField("audio") or len(m.audio.samples) % 4 == 0 for m in scripted.requests)
    assert "half-closed" not in scripted.endings
    # The bridge still serves.
    client = LiveClient(port, "rate=16000")
    client.stop()
    assert client.events()[0][-1][0] == "done"
    client.close()


def test_live_refuses_what_is_not_a_websocket_from_this_page(scripted_bridge):
    url = f"http://127.0.0.1:{scripted_bridge.server_port}/api/live?rate=16000"
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(url, timeout=30)
    assert error.value.code == 400
    client = LiveClient(scripted_bridge.server_port, "rate=16000", origin="http://evil.example")
    assert client.status == 403
    client.close()


def test_live_sessions_are_bounded(scripted):
    server = bridge(scripted.address, max_sessions=1, max_audio_s=0.25)
    port = server.server_port
    try:
        first = LiveClient(port, "rate=16000")
        first.send_audio(np.zeros(1600, np.float32))
        assert first.next_event()[0] == "segment"
        # A second session at once is refused with the reason; the first is untouched.
        events, code = LiveClient(port, "rate=16000").events()
        assert code == rfc6455.TRY_AGAIN_LATER and events[0][1]["reason"] == "TOO_MANY_STREAMS"
        # The session's audio limit (0.25 s) ends the audio as "stop" would: the results follow.
        for _ in range(3):
            first.send_audio(np.zeros(1600, np.float32))
        events, code = first.events()
        first.close()
        assert code == rfc6455.NORMAL
        assert ("stopped", {"message": "the live session reached its limit of 0.25 s of audio",
                            "reason": "INPUT_TOO_LARGE"}) in events
        assert events[-1][0] == "done" and events[-1][1]["transcription"]["duration_s"] == pytest.approx(0.2)
    finally:
        server.shutdown()
        server.server_close()
        server.client.close()


def test_a_burst_of_audio_then_stop_waits_for_the_queue(scripted):
    """Chunks beyond the queue's size hold the page back (the socket is read more slowly);
    "stop" right after them still ends the audio and gets "done", nothing is dropped."""
    server = bridge(scripted.address, max_queued_chunks=1)
    try:
        client = LiveClient(server.server_port, "rate=16000")
        for _ in range(20):
            client.send_audio(np.zeros(1600, np.float32))
        client.stop()
        events, code = client.events()
        client.close()
        assert code == rfc6455.NORMAL and events[-1][0] == "done"
        assert events[-1][1]["transcription"]["duration_s"] == pytest.approx(2.0)
        assert scripted.endings == ["half-closed"]
    finally:
        server.shutdown()
        server.server_close()
        server.client.close()


def test_a_page_that_stops_sending_is_ended(scripted):
    """No message for idle_timeout_s while recording (without "stop"): the page is told, and
    the call is cancelled."""
    server = bridge(scripted.address, idle_timeout_s=1.0)
    port = server.server_port
    try:
        idle = LiveClient(port, "rate=16000")
        idle.send_audio(np.zeros(160, np.float32))
        events, code = idle.events()
        idle.close()
        assert code == rfc6455.POLICY and events[-1][0] == "error"
        assert events[-1][1]["code"] == "DEADLINE_EXCEEDED" and "no audio arrived for 1 s" in events[-1][1]["error"]
        assert scripted.ended.wait(20) and scripted.endings[-1] == "cancelled"
    finally:
        server.shutdown()
        server.server_close()
        server.client.close()


def test_live_says_when_the_grpc_server_is_unreachable():
    server = bridge("127.0.0.1:1")
    try:
        client = LiveClient(server.server_port, "rate=16000")
        client.send_audio(np.zeros(1600, np.float32))
        events, code = client.events()
        client.close()
        assert events[-1][0] == "error" and events[-1][1]["code"] == "UNAVAILABLE"
        assert code == rfc6455.TRY_AGAIN_LATER
    finally:
        server.shutdown()
        server.server_close()
        server.client.close()


# --- against the real server -----------------------------------------------------------------

@pytest.fixture(scope="module")
def real_bridge(grpc_server):
    server = bridge(grpc_server.address)
    yield server
    server.shutdown()
    server.server_close()
    server.client.close()


def test_live_transcription_equals_a_direct_stream_and_the_upload(real_bridge, loaded):
    """A CTC model through the bridge: interim segments while the audio is open, final ones
    replacing them, and the final text that StreamingTranscribe gives for the same chunks
    called directly, and Transcribe for the whole recording with the same chunking."""
    require_servicer("speech_recognition")
    from wav2vec2_checkpoints import audio

    ctc = loaded("ctc")
    samples = audio(4.0, seed=3)
    chunks = np.split(samples, 40)  # 0.1 s each, as the page sends them
    client = LiveClient(real_bridge.server_port, f"rate=16000&model={ctc}&chunk_length_s=1.5&interim_interval_s=0.3")
    for chunk in chunks[:20]:
        client.send_audio(chunk)
    # Interim segments come while the audio is still open.
    before_stop = [client.next_event()]
    while before_stop[-1][1].get("is_final"):
        before_stop.append(client.next_event())
    for chunk in chunks[20:]:
        client.send_audio(chunk)
    client.stop()
    events, code = client.events()
    client.close()
    assert code == rfc6455.NORMAL and events[-1][0] == "done"
    segments = [data for _, data in before_stop] + [data for name, data in events if name == "segment"]
    finals = [s for s in segments if s.get("is_final")]
    assert finals and any(not s.get("is_final") for s in segments)
    assert [s["id"] for s in finals] == [str(i) for i in range(len(finals))]
    text = events[-1][1]["transcription"]["text"]
    direct = list(loaded.client.transcribe_live(iter(chunks), sampling_rate=16000, model=ctc, chunk_length_s=1.5,
                                                interim_interval_s=0.3))
    assert text == direct[-1].done.transcription.text
    assert [s["text"] for s in finals] == [m.segment.text for m in direct if m.HasField("segment")
                                           and m.segment.is_final]
    upload = loaded.client.transcribe(samples, sampling_rate=16000, model=ctc, chunk_length_s=1.5)
    assert text == upload.transcription.text


def test_live_reports_an_unknown_model(real_bridge):
    require_servicer("speech_recognition")
    client = LiveClient(real_bridge.server_port, "rate=16000&model=missing")
    client.send_audio(np.zeros(1600, np.float32))
    events, code = client.events()
    client.close()
    assert events[-1][0] == "error" and events[-1][1]["code"] == "NOT_FOUND"
    assert code == rfc6455.POLICY
