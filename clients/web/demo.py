"""pipeserve web demo: a small page and a stdlib HTTP bridge to the gRPC service.

    python clients/web/demo.py --server 127.0.0.1:50051 --port 8000    # then open http://127.0.0.1:8000

The bridge uses only the standard library (http.server) and the Python client. Streams
(transcription segments, generated tokens) reach the browser as Server-Sent Events over a
POST response, read with fetch(); when the browser goes away the gRPC stream is cancelled,
so the server stops working on it.

    GET  /                     the page (static/index.html, static/app.js)
    GET  /api/models           {"models": [{name, task, state, is_default}, ...]}
    POST /api/classify-image   body: image bytes; ?model=&top_k=   -> {"labels": [...]}
    POST /api/transcribe       body: audio bytes; ?model=&timestamps=&language=&chunk_length_s=
                               -> text/event-stream: "segment" events, then "done"
    POST /api/generate         body: {"prompt", "model", "max_new_tokens", "temperature", "do_sample"}
                               -> text/event-stream: "token" events, then "done"
    GET  /api/live             WebSocket: live microphone audio in, interim and final segments
                               out, through StreamingTranscribe (protocol and bounds: live_session.py)
Errors: JSON {"error", "code", "reason"} with an HTTP status (400 bad input, 404 unknown
model, 501 task not implemented, 503 server unreachable, 502 otherwise); inside a stream,
an "error" event.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

HERE = Path(__file__).resolve().parent
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8"),
          "/capture-worklet.js": ("capture-worklet.js", "text/javascript; charset=utf-8")}
MAX_BODY = 64 << 20  # the gRPC server's default message size limit

if __package__ in (None, ""):
    # Run as a script from a checkout: make the client and generated contracts importable.
    for extra in (HERE.parent / "python", HERE.parents[1] / "service"):
        if extra.is_dir() and str(extra) not in sys.path:
            sys.path.insert(0, str(extra))

from pipeserve_client import Client, PipeserveError, to_dict  # noqa: E402

import live_session as live  # noqa: E402  (clients/web/live_session.py)
import rfc6455 as ws  # noqa: E402  (clients/web/rfc6455.py)

_HTTP_STATUS = {"INVALID_ARGUMENT": 400, "OUT_OF_RANGE": 400, "NOT_FOUND": 404, "FAILED_PRECONDITION": 409,
                "PERMISSION_DENIED": 403, "UNAUTHENTICATED": 401, "RESOURCE_EXHAUSTED": 429, "UNIMPLEMENTED": 501,
                "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}


def _error_payload(error: PipeserveError) -> dict[str, Any]:
    code = error.code.name if error.code is not None else "INVALID_ARGUMENT"
    return {"error": error.details, "code": code, "reason": error.reason, "metadata": error.metadata}


class DemoHandler(BaseHTTPRequestHandler):
    server: "DemoServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet unless asked
        if self.server.verbose:
            super().log_message(format, *args)

    # --- plumbing -----------------------------------------------------------------------

    def _query(self) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload, ensure_ascii=False).encode(), "application/json; charset=utf-8")

    def _fail(self, error: PipeserveError) -> None:
        payload = _error_payload(error)
        self._json(_HTTP_STATUS.get(payload["code"], 502), payload)

    def _body(self) -> bytes | None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._json(413, {"error": f"the upload is larger than {MAX_BODY >> 20} MiB", "code": "INVALID_ARGUMENT",
                             "reason": "INPUT_TOO_LARGE"})
            return None
        return self.rfile.read(length) if length else b""

    def _stream(self, events: Iterator[tuple[str, Any]]) -> None:
        """Server-Sent Events; the gRPC stream is closed (cancelled) if the browser leaves."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")  # the stream ends the response
        self.end_headers()
        self.close_connection = True
        try:
            for name, data in events:
                self.wfile.write(f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode())
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away
        finally:
            close = getattr(events, "close", None)
            if close:
                close()

    # --- routes -------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path in STATIC:
            name, content_type = STATIC[path]
            self._send(200, (HERE / "static" / name).read_bytes(), content_type)
        elif path == "/api/live":
            self._live()
        elif path == "/api/models":
            try:
                models = self.server.client.models.list(timeout=10)
            except PipeserveError as error:
                self._fail(error)
                return
            self._json(200, {"models": [{"name": m.name, "task": to_dict(m).get("task", ""),
                                         "state": to_dict(m).get("state", ""), "is_default": m.is_default}
                                        for m in models]})
        else:
            self._json(404, {"error": f"no such page: {path}", "code": "NOT_FOUND", "reason": ""})

    def _live(self) -> None:
        """The WebSocket upgrade for live transcription; the session itself is live_session.py's."""
        key = self.headers.get("Sec-WebSocket-Key")
        if (self.headers.get("Upgrade", "").lower() != "websocket"
                or "upgrade" not in self.headers.get("Connection", "").lower()
                or self.headers.get("Sec-WebSocket-Version") != "13" or not ws.valid_client_key(key)):
            self._json(400, {"error": "/api/live takes a WebSocket (version 13) connection", "code": "INVALID_ARGUMENT",
                             "reason": ""})
            return
        origin = self.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != self.headers.get("Host"):
            # Another site's page must not stream through this bridge with the user's browser.
            self._json(403, {"error": "a live session must come from this demo's own page", "code": "PERMISSION_DENIED",
                             "reason": ""})
            return
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", ws.accept_key(key))
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        limits = self.server.live_limits
        session = live.LiveSession(self.connection, self.server.client.transcribe_live, limits)
        # Errors found before the call starts go to the page over the socket: a browser's
        # WebSocket cannot read the body of a refused handshake.
        if not self.server.live_slots.acquire(blocking=False):
            session.refuse(live.BridgeError(f"{limits.max_sessions} live sessions are open, the most this demo "
                                            "serves at once; try again when one ends", "RESOURCE_EXHAUSTED",
                                            "TOO_MANY_STREAMS", ws.TRY_AGAIN_LATER))
            return
        try:
            rate, options = live.parse_query(self._query(), limits)
        except live.BridgeError as error:
            self.server.live_slots.release()
            session.refuse(error)
            return
        try:
            session.run(rate, options)
        finally:
            self.server.live_slots.release()

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        handler = {"/api/classify-image": self._classify_image, "/api/transcribe": self._transcribe,
                   "/api/generate": self._generate}.get(path)
        if handler is None:
            self._json(404, {"error": f"no such endpoint: {path}", "code": "NOT_FOUND", "reason": ""})
            return
        body = self._body()
        if body is not None:
            handler(body, self._query())

    def _classify_image(self, body: bytes, query: dict[str, str]) -> None:
        try:
            top_k = int(query["top_k"]) if query.get("top_k") else None
            response = self.server.client.classify_image(body, model=query.get("model", ""), top_k=top_k, timeout=60)
        except ValueError:
            self._json(400, {"error": "top_k must be a whole number", "code": "INVALID_ARGUMENT", "reason": ""})
            return
        except PipeserveError as error:
            self._fail(error)
            return
        self._json(200, to_dict(response))

    def _transcribe(self, body: bytes, query: dict[str, str]) -> None:
        client = self.server.client
        try:
            chunk_length_s = float(query["chunk_length_s"]) if query.get("chunk_length_s") else None
        except ValueError:
            self._json(400, {"error": "chunk_length_s must be a number of seconds", "code": "INVALID_ARGUMENT",
                             "reason": "INVALID_PARAMETER"})
            return

        def events() -> Iterator[tuple[str, Any]]:
            try:
                stream = client.transcribe(body, model=query.get("model", ""), stream=True,
                                           return_timestamps=query.get("timestamps") or True,
                                           language=query.get("language") or None, chunk_length_s=chunk_length_s,
                                           timeout=3600)
                try:
                    for message in stream:
                        if message.HasField("segment"):
                            yield "segment", to_dict(message.segment)
                        elif message.HasField("done"):
                            yield "done", to_dict(message.done)
                finally:
                    stream.close()
            except PipeserveError as error:
                yield "error", _error_payload(error)

        self._stream(events())

    def _generate(self, body: bytes, query: dict[str, str]) -> None:
        try:
            request = json.loads(body or b"{}")
            prompt = str(request["prompt"])
            options = {key: request[key] for key in ("max_new_tokens", "temperature", "do_sample", "top_p", "top_k",
                                                     "seed") if request.get(key) not in (None, "")}
        except (ValueError, KeyError, TypeError):
            self._json(400, {"error": 'send JSON like {"prompt": "Once upon a time"}', "code": "INVALID_ARGUMENT",
                             "reason": ""})
            return
        client = self.server.client

        def events() -> Iterator[tuple[str, Any]]:
            try:
                stream = client.generate(prompt, model=request.get("model") or "", stream=True, timeout=600,
                                         **options)
                try:
                    for message in stream:
                        if message.HasField("token"):
                            yield "token", {"text": message.token.text, "id": message.token.id,
                                            "sequence_index": message.sequence_index}
                        elif message.HasField("done"):
                            yield "done", to_dict(message.done) | {"sequence_index": message.sequence_index}
                finally:
                    stream.close()
            except PipeserveError as error:
                yield "error", _error_payload(error)

        self._stream(events())


class DemoServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], client: Client, verbose: bool = False,
                 live_limits: live.LiveLimits = live.LiveLimits()) -> None:
        super().__init__(address, DemoHandler)
        self.client = client
        self.verbose = verbose
        self.live_limits = live_limits
        self.live_slots = threading.BoundedSemaphore(live_limits.max_sessions)


def make_server(grpc_target: str, host: str = "127.0.0.1", port: int = 8000,
                live_limits: live.LiveLimits = live.LiveLimits(), **client_options: Any) -> DemoServer:
    """A demo server bound to host:port (0 = a free port), talking to the gRPC server."""
    return DemoServer((host, port), Client(grpc_target, **client_options), live_limits=live_limits)


def serve_in_thread(server: DemoServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="pipeserve-web")
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="pipeserve web demo (HTTP bridge to the gRPC service)")
    parser.add_argument("--server", default=os.environ.get("PIPESERVE_SERVER", "127.0.0.1:50051"),
                        help="gRPC server address (default: $PIPESERVE_SERVER or 127.0.0.1:50051)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve the page on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to serve the page on (default 8000)")
    parser.add_argument("--verbose", action="store_true", help="log each HTTP request")
    args = parser.parse_args(argv)
    try:
        server = DemoServer((args.host, args.port), Client(args.server), verbose=args.verbose)
    except OSError as exc:
        print(f"pipeserve web demo: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 4
    print(f"pipeserve web demo on http://{args.host}:{server.server_port} (gRPC server {args.server})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
