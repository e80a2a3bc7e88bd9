"""Local HTTP servers for URI-input tests: a file, a body that drips a byte every 0.5 s, headers
that drip, an endless body, a huge declared length and a redirect. Each handler records when
its client went away, so tests can prove a fetch released its connection (and its worker)."""
from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DRIP_INTERVAL_S = 0.5
DRIP_LIMIT_S = 120.0  # a drip ends by itself after this, so a broken fetch cannot hang the suite forever


class _Handler(BaseHTTPRequestHandler):
    server: "LocalHttpServer"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        self.server.requests.append(self.path)
        try:
            if path == "/file":
                self._headers(200, length=len(self.server.body))
                self.wfile.write(self.server.body)
            elif path == "/drip":
                self._headers(200)
                self._drip(b"x")
            elif path == "/drip-declared":
                self._headers(200, length=10**9)
                self._drip(b"x")
            elif path == "/drip-headers":
                self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                self._drip(b"a")
            elif path == "/endless":
                self._headers(200)
                chunk = b"\0" * 65536
                while self.server.sent < 512 * (1 << 20):
                    self.wfile.write(chunk)
                    self.server.sent += len(chunk)
            elif path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest/meta-data")
                self.end_headers()
            else:
                self._headers(404, length=0)
        except OSError:
            self.server.disconnected()

    def _headers(self, status: int, length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.flush()

    def _drip(self, byte: bytes) -> None:
        started = time.monotonic()
        with self.server.lock:
            self.server.dripping += 1
        try:
            while time.monotonic() - started < DRIP_LIMIT_S:
                self.wfile.write(byte)
                self.wfile.flush()
                time.sleep(DRIP_INTERVAL_S)
        finally:
            with self.server.lock:
                self.server.dripping -= 1


class LocalHttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, body: bytes = b"") -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.body = body
        self.requests: list[str] = []
        self.disconnects: list[float] = []
        self.dripping = 0
        self.sent = 0
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True, name="local-http")
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def host(self) -> str:
        """The allowlist entry for this server."""
        return f"127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def disconnected(self) -> None:
        with self.lock:
            self.disconnects.append(time.monotonic())

    def wait_no_drips(self, timeout: float) -> bool:
        """True once no handler is dripping to a client (each saw its client leave)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.dripping == 0:
                return True
            time.sleep(0.1)
        return self.dripping == 0

    def close(self) -> None:
        self.shutdown()
        self.server_close()
