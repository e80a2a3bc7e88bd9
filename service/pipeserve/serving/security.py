"""Transport security and access control.

- TLS: `tls_cert` + `tls_key` (PEM files) make the server listen with TLS; `tls_client_ca`
  adds mutual TLS: a client must present a certificate signed by that CA, or the handshake
  fails.
- Bearer tokens (`authorization: Bearer <token>` metadata): when `auth_tokens` or
  `admin_tokens` is set, every call except health and reflection needs a known token
  (UNAUTHENTICATED otherwise); ModelService.LoadModel / UnloadModel need an admin token
  (PERMISSION_DENIED for others). The interceptor records each call's caller
  (pipeserve.caller): the model manager lets a task call load a model on demand only for an
  admin token, exactly as LoadModel (see runtime/manager.py). Tokens are compared in constant time: each presented token
  is hashed and compared with every known hash, so neither the match position nor a
  common prefix shows in the timing. An entry "file:PATH" reads tokens from a file (one per
  line, `#` comments), which is how a Kubernetes Secret mounts them.
- Undefined enum numbers: a request holding an enum number the contract does not define gets
  INVALID_ARGUMENT (reason INVALID_ENUM_VALUE) before any servicer runs. (Bytes that do not
  parse at all are the error interceptor's: INVALID_ARGUMENT / MALFORMED_REQUEST.)
- Concurrent streams: one client (its token, else its address) may hold at most
  `max_streams_per_client` streaming calls at once; one more gets RESOURCE_EXHAUSTED
  (reason TOO_MANY_STREAMS), so one client cannot pin every worker with open streams.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path
from typing import Iterable

import grpc

from .. import caller as callers
from ..checkpoints.model_names import check_model_name
from ..config import Settings
from ..errors import InvalidInput, PermissionDenied, PipeserveError, Unauthenticated
from .interceptors import is_repeated, wrap_handler
from .observability import OPEN_PREFIXES, metadata_value

log = logging.getLogger("pipeserve.security")

# ModelService methods that change what the server holds: admin only.
ADMIN_METHODS = frozenset({"/pipeserve.v1.ModelService/LoadModel", "/pipeserve.v1.ModelService/UnloadModel"})


class TooManyStreams(PipeserveError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "TOO_MANY_STREAMS"


# ---- TLS ----------------------------------------------------------------------------------
def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS (or mutual TLS) credentials from the settings; None for a plaintext listener."""
    if not (settings.tls_cert or settings.tls_key or settings.tls_client_ca):
        return None
    if not (settings.tls_cert and settings.tls_key):
        raise SystemExit("TLS needs both tls_cert and tls_key (PEM files)")
    chain = _read(settings.tls_cert, "tls_cert")
    key = _read(settings.tls_key, "tls_key")
    client_ca = _read(settings.tls_client_ca, "tls_client_ca") if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def _read(path: str, name: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SystemExit(f"cannot read {name} {path!r}: {exc.strerror}") from None


# ---- tokens -------------------------------------------------------------------------------
def load_tokens(entries: Iterable[str]) -> list[str]:
    """Settings entries -> tokens: literal tokens, or "file:PATH" with one token per line."""
    tokens: list[str] = []
    for entry in entries:
        if entry.startswith("file:"):
            path = entry[len("file:"):]
            try:
                lines = Path(path).read_text().splitlines()
            except OSError as exc:
                raise SystemExit(f"cannot read token file {path!r}: {exc.strerror}") from None
            tokens += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        elif entry.strip():
            tokens.append(entry.strip())
    return tokens


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class TokenSet:
    """Known tokens as SHA-256 digests; membership is tested against all of them in constant time."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._digests = [_digest(t) for t in tokens]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __contains__(self, token: str) -> bool:
        presented = _digest(token)
        found = False
        for known in self._digests:  # no early exit: the time does not depend on which matched
            found |= hmac.compare_digest(presented, known)
        return found


def bearer_token(metadata) -> str:
    value = metadata_value(metadata, "authorization")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


# ---- enum values the contract does not define ---------------------------------------------
class _UnknownEnum:
    """Stands in for a request that parsed but holds an undefined enum number."""

    def __init__(self, message: str) -> None:
        self.message = message


def _unknown_enum(message, path: str = "") -> str | None:
    """Proto3 enums are open: the wire may carry numbers the contract does not define, which
    Python keeps as plain ints. Refuse them here, naming the field, so that no servicer has to
    guard every enum lookup."""
    for field, value in message.ListFields():
        name = f"{path}{field.name}"
        if field.enum_type is not None:
            for number in (value if is_repeated(field) else (value,)):
                if number not in field.enum_type.values_by_number:
                    return f"{name} = {number} is not a value of {field.enum_type.full_name}"
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            for item in (value if is_repeated(field) else (value,)):
                found = _unknown_enum(item, name + ".")
                if found:
                    return found
    return None


def _enum_checked(deserializer):
    """The handler's deserializer plus the enum check. Bytes that do not parse still raise
    here; the error interceptor's own lenient deserializer (around this one) turns them into
    INVALID_ARGUMENT / MALFORMED_REQUEST."""
    if deserializer is None:
        return None

    def parse(data: bytes):
        request = deserializer(data)
        problem = _unknown_enum(request) if hasattr(request, "ListFields") else None
        if problem:
            return _UnknownEnum(problem)
        bad_name = _bad_model_name(request) if hasattr(request, "ListFields") else None
        return _BadModelName(bad_name) if bad_name else request
    return parse


# ---- model names no model can have --------------------------------------------------------
class _BadModelName:
    """Stands in for a request whose `model` field is too long or holds control characters."""

    def __init__(self, error: PipeserveError) -> None:
        self.error = error


def _bad_model_name(message) -> PipeserveError | None:
    """Every request's `model` (top level, or in a config message such as StreamingTranscribe's)
    is checked before any servicer runs: INVALID_ARGUMENT, before it can reach a URI fetch, a
    path lookup, an error message, a log line or a metric label."""
    for field, value in message.ListFields():
        if field.name == "model" and field.type == field.TYPE_STRING:
            try:
                check_model_name(value)
            except PipeserveError as exc:
                return exc
        elif field.message_type is not None and not is_repeated(field):
            found = _bad_model_name(value)
            if found:
                return found
    return None


def _checked(request):
    if isinstance(request, _UnknownEnum):
        raise InvalidInput(f"unknown enum value: {request.message}", reason="INVALID_ENUM_VALUE")
    if isinstance(request, _BadModelName):
        raise request.error
    return request


async def _checked_stream(requests):
    async for request in requests:
        yield _checked(request)


# ---- the interceptor ----------------------------------------------------------------------
class SecurityInterceptor(grpc.aio.ServerInterceptor):
    """Authentication, admin-only model writes and per-client stream limits. Installed inside
    the error interceptor, so what it raises becomes a status with ErrorInfo."""

    def __init__(self, settings: Settings) -> None:
        admin = load_tokens(settings.admin_tokens)
        self.admins = TokenSet(admin)
        self.users = TokenSet(load_tokens(settings.auth_tokens) + admin)
        self.enabled = bool(self.users)
        self.max_streams = settings.max_streams_per_client
        self._streams: dict[str, int] = {}

    def streams_open(self, client: str) -> int:
        return self._streams.get(client, 0)

    def _check(self, method: str, context: grpc.aio.ServicerContext) -> str:
        """Authenticates the call and records the caller for it (pipeserve.caller: the model
        manager asks whether a task call may load on demand); returns the client identity
        used for stream limits."""
        token = bearer_token(context.invocation_metadata())
        if self.enabled:
            if not token:
                raise Unauthenticated("this server needs a bearer token: send `authorization: Bearer <token>` metadata")
            if token not in self.users:
                raise Unauthenticated("the bearer token is not valid for this server")
            is_admin = token in self.admins
            if method in ADMIN_METHODS and not is_admin:
                raise PermissionDenied(f"{method.rsplit('/', 1)[-1]} needs an admin token")
            client = "token:" + _digest(token).hex()[:16]
        else:
            is_admin, client = False, "peer:" + _peer_host(context.peer())
        # Each call runs in its own asyncio task (a copy of the context): no reset needed.
        callers.set_current(callers.Caller(identity=client, is_admin=is_admin, auth_enabled=self.enabled))
        return client

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        method = details.method
        streaming = bool(handler.request_streaming or handler.response_streaming)
        this = self

        def checked(request):
            return _checked_stream(request) if handler.request_streaming else _checked(request)

        def unary(behavior):
            async def wrapped(request, context):
                client = this._check(method, context)
                if not streaming:
                    return await behavior(checked(request), context)
                with this._stream_slot(client):
                    return await behavior(checked(request), context)
            return wrapped

        def stream(behavior):
            async def wrapped(request, context):
                client = this._check(method, context)
                with this._stream_slot(client):
                    async for item in behavior(checked(request), context):
                        yield item
            return wrapped

        return wrap_handler(handler, unary, stream, _enum_checked(handler.request_deserializer))

    def _stream_slot(self, client: str):
        this = self

        class Slot:
            def __enter__(self):
                held = this._streams.get(client, 0)
                if this.max_streams > 0 and held >= this.max_streams:
                    raise TooManyStreams(f"this client already has {held} streaming calls open (the limit is "
                                         f"{this.max_streams}); close one or retry later")
                this._streams[client] = held + 1

            def __exit__(self, *exc):
                left = this._streams.get(client, 1) - 1
                if left > 0:
                    this._streams[client] = left
                else:
                    this._streams.pop(client, None)
                return False

        return Slot()


def _peer_host(peer: str) -> str:
    """"ipv4:127.0.0.1:54321" -> "127.0.0.1"; "ipv6:[::1]:5" -> "[::1]"; a client's host, not its connection."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host, _, _port = rest.rpartition(":")
        return host or rest
    return peer
