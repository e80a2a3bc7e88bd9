"""The demo's live microphone mode: a WebSocket from the page, relayed to
SpeechRecognitionService.StreamingTranscribe.

    GET /api/live?rate=16000&model=&timestamps=&language=&chunk_length_s=   (WebSocket upgrade)
      page -> bridge   binary messages: mono float32 little-endian samples at `rate`, sent as
                       recorded; then the text message {"type": "stop"}: no more audio
      bridge -> page   text messages {"event": "segment" | "done" | "stopped" | "error", "data": {...}}:
                       "segment" is a Segment (interim or final, replace by id) plus the
                       audio_received_s of the response carrying it; "stopped" says the bridge
                       ended the audio itself (the session's audio limit) and the final results
                       follow; "done" is the TranscriptionDone; "error" is
                       {"error", "code", "reason"} as the other endpoints send it
      then the bridge closes: 1000 after "done", 1008/1009/1011/1013 after an "error".

Everything is bounded (LiveLimits): concurrent sessions, the size of one message, the audio
of one session, the time without a message from the page while recording, and the chunks
waiting for the gRPC call.

Two threads per session. The handler thread reads the socket and feeds a bounded queue that
is the gRPC request iterator (the client sends the config with the first chunk); a relay
thread reads the gRPC responses and writes them to the page. The page leaving (a close frame,
a dropped connection, the idle timeout) cancels the gRPC call, so the server stops decoding
and frees the stream's admission slot; the call ending closes the socket.
"""
from __future__ import annotations

import json
import math
import queue
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable

import rfc6455 as ws
from pipeserve_client import PipeserveError, to_dict

SAMPLE_BYTES = 4  # float32


@dataclass(frozen=True)
class LiveLimits:
    max_sessions: int = 4  # live sessions at once; another one is refused (TOO_MANY_STREAMS)
    max_chunk_s: float = 1.0  # audio in one message (the page sends ~0.1 s)
    max_audio_s: float = 600.0  # audio in one session; then the bridge stops it as "stop" does
    idle_timeout_s: float = 10.0  # no message from the page for this long while recording ends it
    # Chunks waiting for the gRPC call (at most 16 x 1 s of float32 at max_rate: 12 MB); a full
    # queue holds the page back, and after idle_timeout_s full it is told it fell behind.
    max_queued_chunks: int = 16
    min_rate: int = 8000
    max_rate: int = 192000


class BridgeError(Exception):
    """Sent to the page as an "error" event, then the socket closes with `close_code`."""

    def __init__(self, message: str, code: str, reason: str, close_code: int) -> None:
        super().__init__(message)
        self.payload = {"error": message, "code": code, "reason": reason}
        self.close_code = close_code


def _bad_parameter(message: str) -> BridgeError:
    return BridgeError(message, "INVALID_ARGUMENT", "INVALID_PARAMETER", ws.POLICY)


def parse_query(query: dict[str, str], limits: LiveLimits) -> tuple[int, dict[str, Any]]:
    """(sample rate, transcribe_live options) from the URL's query, each field checked."""
    try:
        rate = int(query.get("rate", ""))
    except ValueError:
        raise _bad_parameter("rate must be the sample rate of the audio in hertz, a whole number") from None
    if not limits.min_rate <= rate <= limits.max_rate:
        raise _bad_parameter(f"rate must be between {limits.min_rate} and {limits.max_rate} Hz, got {rate}")
    options: dict[str, Any] = {"model": query.get("model", "")[:1024]}
    timestamps = query.get("timestamps", "segment")
    if timestamps not in ("segment", "word", "char"):
        raise _bad_parameter("timestamps must be segment, word or char")
    options["return_timestamps"] = True if timestamps == "segment" else timestamps
    if query.get("language"):
        options["language"] = query["language"][:32]
    for name in ("chunk_length_s", "interim_interval_s"):
        if query.get(name):
            try:
                value = float(query[name])
            except ValueError:
                value = math.nan
            if not (math.isfinite(value) and value > 0):
                raise _bad_parameter(f"{name} must be a positive number of seconds")
            options[name] = value
    return rate, options


class LiveSession:
    """One page's live stream, from the upgraded socket to the end of the gRPC call."""

    def __init__(self, connection: socket.socket, transcribe_live: Callable[..., Any], limits: LiveLimits) -> None:
        self.connection, self.transcribe_live, self.limits = connection, transcribe_live, limits
        self.socket: ws.WebSocket | None = None
        self.chunks: queue.Queue[bytes | None] = queue.Queue(limits.max_queued_chunks)
        self.stream: Any = None
        self.relay_done = threading.Event()
        self.audio_ended = False

    def refuse(self, error: BridgeError) -> None:
        """Tells the page why no session starts, and closes."""
        self.socket = ws.WebSocket(self.connection, max_message=1024)
        self.relay_done.set()
        self._fail(error)

    def run(self, rate: int, options: dict[str, Any]) -> None:
        max_message = max(1024, int(self.limits.max_chunk_s * rate) * SAMPLE_BYTES)
        self.socket = ws.WebSocket(self.connection, max_message=max_message)
        self.stream = self.transcribe_live(self._requests(), sampling_rate=rate, channels=1,
                                           timeout=self.limits.max_audio_s + 300, **options)
        relay = threading.Thread(target=self._relay, name="pipeserve-web-live-relay", daemon=True)
        relay.start()
        try:
            self._read(rate)
        except BridgeError as error:
            self._fail(error)
        except (ws.Closed, ws.ProtocolError, OSError) as exc:
            # The page left (or broke the protocol) before the results were all sent: the call
            # is cancelled, so the server stops working on it.
            self._cancel()
            if isinstance(exc, ws.ProtocolError):
                self.socket.close(exc.code, str(exc))
        finally:
            relay.join(timeout=5)
            if relay.is_alive():  # the server did not answer in time: give up on it
                self._cancel()
                relay.join(timeout=5)
            self.socket.close(ws.NORMAL)

    # --- page -> gRPC -------------------------------------------------------------------

    def _read(self, rate: int) -> None:
        sent = 0  # bytes of audio forwarded
        max_bytes = int(self.limits.max_audio_s * rate) * SAMPLE_BYTES
        while not self.relay_done.is_set():
            # While recording, a page that sends nothing for idle_timeout_s is gone or stuck;
            # after "stop" the page only waits, so the read just watches for it leaving.
            wait = 0.5 if self.audio_ended else self.limits.idle_timeout_s
            if not self.socket.wait_readable(wait):
                if self.audio_ended:
                    continue
                raise BridgeError(f"no audio arrived for {self.limits.idle_timeout_s:g} s; the live session ended",
                                  "DEADLINE_EXCEEDED", "", ws.POLICY)
            opcode, data = self.socket.receive()
            if self.audio_ended:
                continue  # audio after "stop" (or after the limit) is not forwarded
            if opcode == ws.TEXT:
                try:
                    command = json.loads(data)
                except ValueError:
                    command = None
                if not (isinstance(command, dict) and command.get("type") == "stop"):
                    raise BridgeError('the only text message is {"type": "stop"}', "INVALID_ARGUMENT",
                                      "INVALID_INPUT", ws.POLICY)
                self._end_audio(first_chunk_if_none=sent == 0)
                continue
            if len(data) % SAMPLE_BYTES:
                raise BridgeError("an audio message must hold whole float32 samples (a multiple of 4 bytes)",
                                  "INVALID_ARGUMENT", "INVALID_INPUT", ws.UNSUPPORTED)
            if sent + len(data) > max_bytes:
                self._send("stopped", {"message": f"the live session reached its limit of "
                                                  f"{self.limits.max_audio_s:g} s of audio",
                                       "reason": "INPUT_TOO_LARGE"})
                self._end_audio(first_chunk_if_none=sent == 0)
                continue
            self._enqueue(data)
            sent += len(data)

    def _requests(self):
        """The audio chunks for the gRPC call, until "stop" (None)."""
        while (chunk := self.chunks.get()) is not None:
            yield chunk

    def _enqueue(self, item: bytes | None) -> None:
        """Waits while the queue is full (the page is held back), up to the idle timeout."""
        try:
            self.chunks.put(item, timeout=self.limits.idle_timeout_s)
        except queue.Full:
            raise BridgeError("the transcription fell behind the audio; the live session ended",
                              "RESOURCE_EXHAUSTED", "", ws.TRY_AGAIN_LATER) from None

    def _end_audio(self, first_chunk_if_none: bool) -> None:
        """No more audio: the request iterator ends, so the server finishes the transcription."""
        self.audio_ended = True
        if first_chunk_if_none:
            # The client sends the config with the first chunk: a session stopped before any
            # audio still opens the stream, and gets an empty transcription back.
            self._enqueue(b"")
        self._enqueue(None)

    # --- gRPC -> page -------------------------------------------------------------------

    def _relay(self) -> None:
        try:
            for message in self.stream:
                if message.HasField("segment"):
                    self._send("segment", to_dict(message.segment) | {"audio_received_s": message.audio_received_s})
                elif message.HasField("done"):
                    self._send("done", to_dict(message.done))
            self.socket.close(ws.NORMAL)
        except PipeserveError as error:
            code = error.code.name if error.code is not None else "UNKNOWN"
            if code != "CANCELLED":
                self._fail(BridgeError(error.details, code, error.reason,
                                       ws.TRY_AGAIN_LATER if code in ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
                                       else ws.INTERNAL if code in ("INTERNAL", "UNKNOWN") else ws.POLICY))
        except OSError:
            self._cancel()  # the page is gone
        finally:
            self.relay_done.set()
            self._drain()

    def _send(self, event: str, data: Any) -> None:
        self.socket.send_text(json.dumps({"event": event, "data": data}, ensure_ascii=False))

    def _fail(self, error: BridgeError) -> None:
        self._cancel()
        try:
            self._send("error", error.payload)
        except OSError:
            pass
        self.socket.close(error.close_code, error.payload["error"])

    def _cancel(self) -> None:
        if self.stream is not None:
            self.stream.cancel()
        self._drain()

    def _drain(self) -> None:
        """Ends the request iterator: a gRPC thread may be waiting on it."""
        while True:
            try:
                self.chunks.get_nowait()
            except queue.Empty:
                break
        try:
            self.chunks.put_nowait(None)
        except queue.Full:
            pass
