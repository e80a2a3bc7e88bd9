"""W3C trace context for outgoing calls: each call carries a `traceparent` (and `tracestate`)
metadata entry, so the server's span for it joins the caller's trace. The context comes from
`traceparent("00-...")` around the calls when the caller gives one, else from the current
OpenTelemetry span when opentelemetry is installed and a span is active; otherwise nothing is
sent. opentelemetry is not a dependency of the client."""
from __future__ import annotations

import contextlib
import re
from contextvars import ContextVar
from typing import Iterator

from .errors import InputError

# version 00: "00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>", ids not all zeros
# (https://www.w3.org/TR/trace-context/#traceparent-header-field-values).
_TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")

_given: ContextVar[str | None] = ContextVar("pipeserve_client_traceparent", default=None)


@contextlib.contextmanager
def traceparent(value: str) -> Iterator[None]:
    """Calls made inside the block (this thread or asyncio task) carry `value` as their W3C
    traceparent, e.g. one received from an upstream HTTP request:

        with pipeserve_client.traceparent(request.headers["traceparent"]):
            client.transcribe("a.wav")
    """
    if not isinstance(value, str) or not _TRACEPARENT.fullmatch(value):
        raise InputError(f"traceparent must be a W3C version-00 traceparent, got {str(value)[:80]!r}")
    token = _given.set(value)
    try:
        yield
    finally:
        _given.reset(token)


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """The trace-context metadata for a call made now (empty when there is none)."""
    given = _given.get()
    if given is not None:
        return (("traceparent", given),)
    try:
        from opentelemetry import propagate
    except ImportError:
        return ()
    carrier: dict[str, str] = {}
    propagate.inject(carrier)  # writes nothing without a valid current span
    return tuple((key, value) for key, value in carrier.items() if key in ("traceparent", "tracestate"))
