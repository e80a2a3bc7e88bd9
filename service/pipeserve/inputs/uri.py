"""URI inputs, off by default: http(s) only from allow-listed hosts, file paths only under a
configured root (resolved, so '..' and symlinks cannot escape it). No SSRF, no traversal.

A URI is checked before anything is fetched: control characters (NUL, CR, LF...), user info
(`http://allowed@elsewhere/` reads as one host to a person and another to a parser), bad ports
and overlong URIs are INVALID_ARGUMENT/INVALID_URI. Allowlist entries are "host" (the scheme's
default port only: 80 for http, 443 for https) or "host:port" (that port only; IPv6 as
"[::1]:8080").

Fetches are bounded three ways: bytes (the declared length is checked first, then the body is
counted while it streams), time (the server's `uri_fetch_timeout_s`, or the caller's shorter
deadline, covers connect, headers and body; a watchdog closes the socket, so a server that
drips one byte at a time cannot hold a worker past it) and concurrency (a dedicated pool of
`uri_fetch_concurrency` workers; when all are busy the call is refused with QUEUE_FULL at once
rather than queued behind slow fetches). A caller that goes away (deadline, cancellation)
aborts its fetch and frees the worker."""
from __future__ import annotations

import asyncio
import http.client
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit

import grpc

from ..config import Settings
from ..errors import InputTooLarge, InvalidInput, PipeserveError, QueueFull, UriNotAllowed

MAX_URI_CHARS = 4096
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CHUNK = 64 * 1024


class UriFetchTimeout(PipeserveError):
    """The fetch did not finish within the server's cap or the caller's deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "URI_FETCH_TIMEOUT"


def _shown(uri: str) -> str:
    """The URI as it may appear in an error: bounded, control characters escaped."""
    text = uri if len(uri) <= 120 else uri[:120] + f"... ({len(uri)} characters)"
    return repr(text)


def _invalid(uri: str, why: str) -> InvalidInput:
    return InvalidInput(f"invalid URI {_shown(uri)}: {why}", reason="INVALID_URI")


def parse(uri: str) -> SplitResult:
    """Splits a URI after refusing what no well-formed input URI contains."""
    if len(uri) > MAX_URI_CHARS:
        raise _invalid(uri, f"longer than {MAX_URI_CHARS} characters")
    if any(ord(c) < 0x21 or ord(c) > 0x7E for c in uri):
        raise _invalid(uri, "contains a control character, whitespace or non-ASCII character (percent-encode it)")
    try:
        parsed = urlsplit(uri)
        parsed.port  # noqa: B018 - raises ValueError on a port that is not a number in range
    except ValueError as exc:
        raise _invalid(uri, str(exc)) from None
    if "@" in parsed.netloc:
        raise _invalid(uri, "user info (user@host) is not accepted")
    if parsed.scheme in _DEFAULT_PORTS and not parsed.hostname:
        raise _invalid(uri, "no host")
    return parsed


def host_allowed(host: str, port: int, scheme: str, entries: tuple[str, ...] | list[str]) -> bool:
    """An entry "host" allows the scheme's default port; "host:port" allows that port only."""
    host = host.lower()
    for entry in entries:
        entry_host, entry_port = _split_entry(entry.strip().lower())
        wanted = entry_port if entry_port is not None else _DEFAULT_PORTS.get(scheme)
        if entry_host == host and wanted == port:
            return True
    return False


def _split_entry(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):  # [IPv6] or [IPv6]:port
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    host, sep, port = entry.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host, int(port)
    return entry, None


def fetch(uri: str, settings: Settings, max_bytes: int, *, timeout_s: float | None = None,
          abort: "FetchAbort | None" = None) -> bytes:
    """The bytes at `uri`, within `max_bytes` and min(timeout_s, settings.uri_fetch_timeout_s)."""
    parsed = parse(uri)
    if parsed.scheme in _DEFAULT_PORTS:
        limit = settings.uri_fetch_timeout_s if timeout_s is None else min(timeout_s, settings.uri_fetch_timeout_s)
        return _fetch_http(uri, parsed, settings, max_bytes, max(limit, 0.0), abort or FetchAbort())
    if parsed.scheme == "file":
        return _read_file(uri, Path(unquote(parsed.path)), settings, max_bytes)
    raise UriNotAllowed(f"URI scheme {parsed.scheme[:20] or '(none)'!r} is not supported; use http(s):// or file://")


class FetchAbort:
    """Lets another thread stop a fetch: shuts its socket down, so a blocked read returns."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.aborted = False

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            if self.aborted:
                self._shutdown()

    def __call__(self) -> None:
        with self._lock:
            self.aborted = True
            self._shutdown()

    def _shutdown(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _fetch_http(uri: str, parsed: SplitResult, settings: Settings, max_bytes: int, limit_s: float,
                abort: FetchAbort) -> bytes:
    host, scheme = parsed.hostname or "", parsed.scheme
    port = parsed.port or _DEFAULT_PORTS[scheme]
    if not host_allowed(host, port, scheme, settings.uri_http_hosts):
        raise UriNotAllowed(f"{host[:100]!r} port {port} is not in the server's URI allowlist")
    deadline = time.monotonic() + limit_s
    # The watchdog bounds what socket timeouts cannot: a server sending one byte every half
    # second never trips a per-read timeout, in the headers or in the body.
    watchdog = threading.Timer(limit_s, abort)
    watchdog.daemon = True
    watchdog.start()
    if scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, port, timeout=max(limit_s, 0.001), context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=max(limit_s, 0.001))
    sock: socket.socket | None = None
    response: http.client.HTTPResponse | None = None
    try:
        conn.connect()
        sock = conn.sock  # the connection forgets it once a "Connection: close" response starts
        abort.attach(sock)
        path = parsed.path or "/"
        conn.request("GET", path + ("?" + parsed.query if parsed.query else ""),
                     headers={"Accept-Encoding": "identity", "Connection": "close"})
        response = conn.getresponse()
        if 300 <= response.status < 400:
            raise UriNotAllowed(f"{_shown(uri)} redirects (HTTP {response.status}); redirects are not followed")
        if response.status != 200:
            raise InvalidInput(f"could not fetch {_shown(uri)}: HTTP {response.status}", reason="URI_FETCH_FAILED")
        declared = response.getheader("Content-Length")
        if declared and declared.strip().isdigit() and int(declared) > max_bytes:
            raise InputTooLarge(f"{_shown(uri)} declares {int(declared)} bytes, over the {max_bytes} byte limit")
        body = bytearray()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UriFetchTimeout(f"fetching {_shown(uri)} took longer than {limit_s:g} s")
            sock.settimeout(remaining)
            chunk = response.read1(_CHUNK)
            if not chunk:
                break
            body += chunk
            if len(body) > max_bytes:
                raise InputTooLarge(f"{_shown(uri)} is larger than the {max_bytes} byte limit")
        if abort.aborted:  # the shutdown may look like a clean end of the body
            raise UriFetchTimeout(f"fetching {_shown(uri)} was stopped after {limit_s:g} s or by its caller")
        return bytes(body)
    except PipeserveError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if abort.aborted or time.monotonic() >= deadline:
            raise UriFetchTimeout(f"fetching {_shown(uri)} took longer than {limit_s:g} s or was stopped") from None
        raise InvalidInput(f"could not fetch {_shown(uri)}: {type(exc).__name__}: {str(exc)[:200]}",
                           reason="URI_FETCH_FAILED") from None
    finally:
        watchdog.cancel()
        # The response keeps the socket open through its file object: shut it down so the
        # peer sees the end now, whatever still holds a reference.
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if response is not None:
            response.close()
        conn.close()


def _read_file(uri: str, path: Path, settings: Settings, max_bytes: int) -> bytes:
    if not settings.uri_file_root:
        raise UriNotAllowed("file:// URIs are disabled on this server (no uri_file_root configured)")
    root = Path(settings.uri_file_root).resolve()
    try:
        target = path.resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # symlink loops and the like
        raise _invalid(uri, type(exc).__name__) from None
    if not target.is_relative_to(root):
        raise UriNotAllowed(f"{_shown(str(path))} is outside the allowed root")
    if not target.is_file():  # also refuses FIFOs and devices, which could block a reader forever
        raise InvalidInput(f"{_shown(str(path))} does not exist", reason="URI_FETCH_FAILED")
    try:
        with target.open("rb") as file:
            data = file.read(max_bytes + 1)  # the file may grow after a size check
    except OSError as exc:
        raise InvalidInput(f"could not read {_shown(str(path))}: {exc.strerror}", reason="URI_FETCH_FAILED") from None
    if len(data) > max_bytes:
        raise InputTooLarge(f"{_shown(str(path))} is larger than the {max_bytes} byte limit")
    return data


# ---- on the event loop -------------------------------------------------------------------------

class _FetchPool:
    """The dedicated workers fetches run on, and how many are taken right now."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pipeserve-uri")
        self.busy = 0


_pools: dict[int, _FetchPool] = {}
_pools_lock = threading.Lock()


def _pool(workers: int) -> _FetchPool:
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = _FetchPool(workers)
        return _pools[workers]


async def fetch_async(uri: str, settings: Settings, max_bytes: int, *, timeout_s: float | None = None) -> bytes:
    """`fetch` on the dedicated pool. Cancelling the awaiting task (grpc.aio does when the
    call's deadline passes or the client cancels) aborts the fetch and frees its worker."""
    parse(uri)  # malformed URIs are refused without taking a worker
    pool = _pool(settings.uri_fetch_concurrency)
    if pool.busy >= pool.workers:
        raise QueueFull(f"all {pool.workers} URI fetch workers are busy; retry later or send the bytes inline")
    abort = FetchAbort()
    future = asyncio.get_running_loop().run_in_executor(
        pool.executor, lambda: fetch(uri, settings, max_bytes, timeout_s=timeout_s, abort=abort))
    # The worker counts as busy until its thread is done, not until this caller stops waiting.
    pool.busy += 1
    future.add_done_callback(lambda _: setattr(pool, "busy", pool.busy - 1))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        abort()
        raise
