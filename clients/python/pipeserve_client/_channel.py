"""Connection settings shared by both clients: target, TLS / mTLS credentials, bearer token,
message sizes, and the retry policy of common.proto (UNAVAILABLE, RESOURCE_EXHAUSTED with
QUEUE_FULL) with exponential backoff and full jitter."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import grpc

from .errors import InputError, PipeserveError
from .inputs import read_file

DEFAULT_SERVER = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20  # the server's default max message size
USER_AGENT = "pipeserve-python/0.1"


def default_target() -> str:
    return os.environ.get("PIPESERVE_SERVER") or DEFAULT_SERVER


@dataclass(frozen=True)
class RetryPolicy:
    """How failed calls are retried. Only failures common.proto documents as retryable are
    retried; a stream is retried only before its first message arrives. The wait before retry
    n (0-based) is uniform in [0, min(max_backoff_s, initial_backoff_s * multiplier**n)]
    ("full jitter", so many clients do not retry in step), and never less than the server's
    ErrorInfo "retry_after_ms" hint. The call's deadline bounds the whole sequence: a retry
    is made only when at least min_attempt_s of the deadline is left once the wait is over,
    so a call that runs out of time fails with the error that made it retry, not with a
    DEADLINE_EXCEEDED from an attempt that never had a chance."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    min_attempt_s: float = 0.05

    def should_retry(self, error: PipeserveError, attempt: int) -> bool:
        """attempt: how many attempts have been made so far (1 after the first failure)."""
        return error.retryable and attempt < self.max_attempts

    def backoff_s(self, retry: int, error: PipeserveError | None = None) -> float:
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** retry)
        delay = random.uniform(0.0, cap)
        hint = (error.metadata.get("retry_after_ms") if error is not None else None)
        if hint:
            try:
                delay = max(delay, float(hint) / 1000.0)
            except ValueError:
                pass
        return delay


NO_RETRY = RetryPolicy(max_attempts=1)


def _pem(value: bytes | str | os.PathLike | None, what: str) -> bytes | None:
    """PEM bytes given directly, or a path to read them from."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    return read_file(value, what)


@dataclass(frozen=True)
class Connection:
    """Everything needed to open a channel to one server."""

    target: str
    tls: bool = False
    root_certificates: bytes | None = None
    client_certificate: bytes | None = None
    client_key: bytes | None = None
    server_name: str | None = None
    token: str | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    @classmethod
    def create(cls, target: str | None, *, tls: bool | None, root_certificates: Any, client_certificate: Any,
               client_key: Any, server_name: str | None, token: str | None,
               max_message_bytes: int | None) -> "Connection":
        roots = _pem(root_certificates, "TLS root certificate")
        cert = _pem(client_certificate, "TLS client certificate")
        key = _pem(client_key, "TLS client key")
        if (cert is None) != (key is None):
            raise InputError("mutual TLS needs both a client certificate and its key")
        use_tls = bool(tls) or any(v is not None for v in (roots, cert, key))
        if tls is False and use_tls:
            raise InputError("TLS certificates were given but tls=False")
        return cls(target=target or default_target(), tls=use_tls, root_certificates=roots,
                   client_certificate=cert, client_key=key, server_name=server_name, token=token,
                   max_message_bytes=max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES)

    def options(self, extra: tuple[tuple[str, Any], ...] = ()) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.primary_user_agent", USER_AGENT),
            # Keepalive pings notice a server that went away mid-stream without closing the
            # connection; the server permits pings every 5 s (server.py).
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            # Retries are ours (documented codes only); grpc's transparent retries stay on.
            ("grpc.enable_retries", 1),
        ]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options + list(extra)

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.root_certificates,
                                            private_key=self.client_key,
                                            certificate_chain=self.client_certificate)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        # A bearer token travels as call metadata, so it works over TLS and, for local
        # development behind a TLS-terminating proxy, over a plaintext channel too.
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def sync_channel(self, extra: tuple[tuple[str, Any], ...] = ()) -> grpc.Channel:
        credentials = self.credentials()
        if credentials is None:
            return grpc.insecure_channel(self.target, options=self.options(extra))
        return grpc.secure_channel(self.target, credentials, options=self.options(extra))

    def aio_channel(self, extra: tuple[tuple[str, Any], ...] = ()) -> grpc.aio.Channel:
        credentials = self.credentials()
        if credentials is None:
            return grpc.aio.insecure_channel(self.target, options=self.options(extra))
        return grpc.aio.secure_channel(self.target, credentials, options=self.options(extra))
