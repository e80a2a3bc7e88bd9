"""A scripted stand-in server for client tests of what a healthy pipeserve rarely does on
demand: fail with retryable and non-retryable statuses, stall past deadlines, break streams,
require TLS, mutual TLS or a bearer token. It serves the real contracts (ModelService and
TextGenerationService) with the real error encoding (google.rpc.Status + ErrorInfo)."""
from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent import futures
from pathlib import Path

import grpc

TLS_DIR = Path(__file__).parent / "tls"


def abort(context, code: grpc.StatusCode, message: str, reason: str = "", metadata: dict | None = None):
    from google.protobuf import any_pb2
    from google.rpc import error_details_pb2, status_pb2
    from grpc_status import rpc_status

    details = []
    if reason:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="pipeserve.dev", metadata=metadata or {}))
        details.append(detail)
    context.abort_with_status(rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message,
                                                                     details=details)))


OUTCOMES = {
    "unavailable": (grpc.StatusCode.UNAVAILABLE, "try again", "", None),
    "draining": (grpc.StatusCode.UNAVAILABLE, "the server is shutting down", "DRAINING", None),
    "queue_full": (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", "QUEUE_FULL", {"retry_after_ms": "50"}),
    "oom": (grpc.StatusCode.RESOURCE_EXHAUSTED, "out of memory", "OUT_OF_MEMORY", None),
    "invalid": (grpc.StatusCode.INVALID_ARGUMENT, "top_k must be at least 1", "INVALID_PARAMETER", {"field": "top_k"}),
    "internal": (grpc.StatusCode.INTERNAL, "internal error in ListModels: ValueError", "INTERNAL_ERROR", None),
}


class FakeServer:
    """plan: outcomes for successive ListModels calls ("ok", "slow", or a key of OUTCOMES);
    stream_plan: outcomes for successive GenerateStream calls ("ok", "fail_before",
    "fail_after", "slow", "exit_after": the process dies after two tokens)."""

    def __init__(self, *, tls: str | None = None, token: str | None = None) -> None:
        from pipeserve.v1 import model_pb2_grpc, text_generation_pb2_grpc

        self.plan: list[str] = []
        self.stream_plan: list[str] = []
        self.calls: Counter[str] = Counter()
        self.cancelled = threading.Event()
        self.token = token
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        model_pb2_grpc.add_ModelServiceServicer_to_server(_Models(self), self.server)
        text_generation_pb2_grpc.add_TextGenerationServiceServicer_to_server(_Generation(self), self.server)
        from pipeserve.v1 import speech_recognition_pb2_grpc
        speech_recognition_pb2_grpc.add_SpeechRecognitionServiceServicer_to_server(_Speech(self), self.server)
        self.requests: list = []  # speech requests received, for checks of what the client sent
        # Transcribe calls in flight now and at most, and those cancelled by the client.
        self.in_flight = self.peak_in_flight = 0
        self.in_flight_changed = threading.Condition()
        self.transcribe_cancelled = 0
        self.gate_timeouts = 0  # b"gate:N" calls that gave up waiting
        if tls:
            credentials = grpc.ssl_server_credentials(
                [((TLS_DIR / "server.key").read_bytes(), (TLS_DIR / "server.pem").read_bytes())],
                root_certificates=(TLS_DIR / "ca.pem").read_bytes() if tls == "mtls" else None,
                require_client_auth=tls == "mtls")
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
            self.address = f"localhost:{self.port}"
        else:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
            self.address = f"127.0.0.1:{self.port}"
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0)

    def check_token(self, context) -> None:
        if self.token is None:
            return
        metadata = dict(context.invocation_metadata())
        if metadata.get("authorization") != f"Bearer {self.token}":
            abort(context, grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required")

    def next(self, plan: list[str]) -> str:
        return plan.pop(0) if plan else "ok"


def _servicer_base(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(f"pipeserve.v1.{module}_pb2_grpc"), name)


class _Models(_servicer_base("model", "ModelServiceServicer")):
    def __init__(self, fake: FakeServer) -> None:
        self.fake = fake

    def ListModels(self, request, context):
        from pipeserve.v1 import model_pb2

        self.fake.calls["ListModels"] += 1
        self.fake.check_token(context)
        outcome = self.fake.next(self.fake.plan)
        if outcome == "slow":
            time.sleep(2.0)
        elif outcome != "ok":
            code, message, reason, metadata = OUTCOMES[outcome]
            abort(context, code, message, reason, metadata)
        # in_flight reports how many ListModels calls arrived, so clients in other languages
        # can check their retry count.
        return model_pb2.ListModelsResponse(models=[model_pb2.ModelInfo(
            name="fake-model", state=model_pb2.MODEL_STATE_READY, in_flight=self.fake.calls["ListModels"])])


class _Generation(_servicer_base("text_generation", "TextGenerationServiceServicer")):
    def __init__(self, fake: FakeServer) -> None:
        self.fake = fake

    def GenerateStream(self, request, context):
        from pipeserve.v1 import text_generation_pb2 as pb

        self.fake.calls["GenerateStream"] += 1
        self.fake.check_token(context)
        context.add_callback(lambda: None if context.is_active() else self.fake.cancelled.set())
        outcome = self.fake.next(self.fake.stream_plan)
        if outcome == "fail_before":
            abort(context, grpc.StatusCode.UNAVAILABLE, "not ready yet")
        words = ["Once", " upon", " a", " time"]
        for i, word in enumerate(words):
            if outcome in ("fail_after", "exit_after") and i == 2:
                if outcome == "exit_after":
                    import os
                    time.sleep(0.3)  # let the two tokens already yielded reach the client
                    os._exit(1)  # the whole server process disappears mid-stream
                abort(context, grpc.StatusCode.UNAVAILABLE, "connection reset")
            if outcome == "slow":
                time.sleep(0.5)
            yield pb.GenerateStreamResponse(request_id=request.request_id or "r",
                                            token=pb.Token(id=i, text=word))
        yield pb.GenerateStreamResponse(request_id=request.request_id or "r", done=pb.GenerationDone(
            finish_reason=pb.FINISH_REASON_LENGTH, generated_tokens=len(words), text="".join(words)))


class _Speech(_servicer_base("speech_recognition", "SpeechRecognitionServiceServicer")):
    """Three 1-second segments of a 3-second input; the second arrives first as an interim
    segment and is then replaced (same id) by its final version.

    Transcribe counts the calls in flight, and the audio bytes script it: b"fail" answers
    INVALID_ARGUMENT; b"hold" waits until the client cancels (or 10 s); b"gate:N" waits until
    N calls have been in flight together once (or 5 s), so a test of a concurrency bound does not depend
    on timing; b"sleep:S" waits S seconds; b"text:T" answers T as the text; b"stats" answers
    "peak=P cancelled=C received=R gate_timeouts=G" (calls in flight at most, cancelled,
    received so far, gates that gave up).
    Directives run in order, joined with "|" (b"gate:4|fail", b"sleep:0.2|text:a")."""

    def __init__(self, fake: FakeServer) -> None:
        self.fake = fake

    @staticmethod
    def _segments():
        from pipeserve.v1 import speech_recognition_pb2 as pb

        return [pb.Segment(id=f"s{i}", start_s=float(i), end_s=float(i + 1), text=f" part {i}", is_final=True)
                for i in range(3)]

    def Transcribe(self, request, context):
        fake = self.fake
        with fake.in_flight_changed:
            fake.requests.append(request)
            fake.in_flight += 1
            fake.peak_in_flight = max(fake.peak_in_flight, fake.in_flight)
            fake.in_flight_changed.notify_all()
        try:
            return self._transcribe(request, context)
        finally:
            with fake.in_flight_changed:
                fake.in_flight -= 1
                fake.in_flight_changed.notify_all()

    def _transcribe(self, request, context):
        from pipeserve.v1 import speech_recognition_pb2 as pb

        text = None
        for directive in request.audio.data.split(b"|"):
            name, _, value = directive.decode(errors="replace").partition(":")
            if name == "fail":
                abort(context, grpc.StatusCode.INVALID_ARGUMENT, "cannot decode the audio", "INVALID_INPUT")
            elif name == "hold":
                end = time.monotonic() + 10.0
                while context.is_active() and time.monotonic() < end:
                    time.sleep(0.01)
                if not context.is_active():
                    with self.fake.in_flight_changed:
                        self.fake.transcribe_cancelled += 1
                    return pb.TranscribeResponse()
            elif name == "gate":
                with self.fake.in_flight_changed:
                    if not self.fake.in_flight_changed.wait_for(lambda: self.fake.peak_in_flight >= int(value),
                                                                timeout=5.0):
                        self.fake.gate_timeouts += 1
            elif name == "sleep":
                time.sleep(float(value))
            elif name == "text":
                text = value
            elif name == "stats":  # for clients in other processes (the Node tests)
                with self.fake.in_flight_changed:
                    text = (f"peak={self.fake.peak_in_flight} cancelled={self.fake.transcribe_cancelled} "
                            f"received={len(self.fake.requests)} gate_timeouts={self.fake.gate_timeouts}")
        segments = self._segments()
        return pb.TranscribeResponse(request_id=request.request_id, transcription=pb.Transcription(
            text="".join(s.text for s in segments) if text is None else text, segments=segments, duration_s=3.0,
            language="en"))

    def TranscribeStream(self, request, context):
        from pipeserve.v1 import speech_recognition_pb2 as pb

        self.fake.requests.append(request)
        segments = self._segments()
        for i, segment in enumerate(segments):
            if i == 1:
                interim = pb.Segment(id="s1", start_s=1.0, text=" par", is_final=False)
                yield pb.TranscribeStreamResponse(request_id=request.request_id, segment=interim)
            time.sleep(0.05)
            yield pb.TranscribeStreamResponse(request_id=request.request_id, segment=segment)
        yield pb.TranscribeStreamResponse(request_id=request.request_id, done=pb.TranscriptionDone(
            transcription=pb.Transcription(text="".join(s.text for s in segments), segments=segments,
                                           duration_s=3.0, language="en")))

    def StreamingTranscribe(self, request_iterator, context):
        """Echoes what arrived: an interim segment per chunk (seconds received so far), a
        final one every second chunk, then `done` after the client half-closes."""
        import numpy as np

        from pipeserve.v1 import speech_recognition_pb2 as pb

        config, received_s, chunks = None, 0.0, 0
        for message in request_iterator:
            self.fake.requests.append(message)
            if message.HasField("config"):
                config = message.config
                continue
            dtype = "<f4" if config.format == 1 else "<i2"
            frames = len(np.frombuffer(message.audio.samples, dtype)) / max(1, config.channels)
            received_s += frames / config.sample_rate
            chunks += 1
            final = chunks % 2 == 0
            segment = pb.Segment(id=f"s{(chunks - 1) // 2}", start_s=0.0, text=f" chunk {chunks}", is_final=final)
            if final:
                segment.end_s = received_s
            yield pb.StreamingTranscribeResponse(request_id=config.request_id, segment=segment,
                                                 audio_received_s=received_s)
        yield pb.StreamingTranscribeResponse(request_id=config.request_id, audio_received_s=received_s,
                                             done=pb.TranscriptionDone(transcription=pb.Transcription(
                                                 text="live", duration_s=received_s)))


def main() -> None:
    """`python tests/client_fakes.py [--plan a,b] [--tls tls|mtls] [--token T] [stream outcome...]`:
    serve on a free port in this process, print the address, and run until killed (the CLI
    and Node tests use it, e.g. for a server that dies mid-stream)."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", default="")
    parser.add_argument("--tls", choices=["tls", "mtls"])
    parser.add_argument("--token")
    parser.add_argument("stream_plan", nargs="*")
    args = parser.parse_args()
    fake = FakeServer(tls=args.tls, token=args.token)
    fake.plan = [p for p in args.plan.split(",") if p]
    fake.stream_plan = args.stream_plan
    print(fake.address, flush=True)
    fake.server.wait_for_termination()


if __name__ == "__main__":
    main()
