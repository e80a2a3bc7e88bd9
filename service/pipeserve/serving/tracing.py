"""OpenTelemetry hook: one SERVER span per RPC when `Settings.tracing` is on and the
`opentelemetry-api` package is installed. It is not a dependency: without it (or with tracing
off) `make_tracer` returns None and calls pay nothing. Exporters and sampling are configured
the OpenTelemetry way (an SDK set up by `opentelemetry-instrument` or by the embedding
process); the W3C `traceparent` of the caller's metadata becomes the span's parent. While the
span is open, its trace and span ids stamp the call's log lines (logs.trace_ids_var)."""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

from .logs import trace_ids_var

log = logging.getLogger("pipeserve.tracing")


def make_tracer(enabled: bool) -> Any | None:
    if not enabled:
        return None
    try:
        from opentelemetry import trace
    except ImportError:
        log.warning("tracing is on but opentelemetry is not installed (pip install opentelemetry-sdk); "
                    "no spans will be recorded")
        return None
    return trace.get_tracer("pipeserve")


@contextlib.contextmanager
def rpc_span(tracer: Any | None, method: str, metadata: tuple | None, request_id: str) -> Iterator[Any]:
    """A span named after the full method ("pipeserve.v1.FooService/Bar"), or a no-op."""
    if tracer is None:
        yield None
        return
    from opentelemetry import propagate, trace

    carrier = {k: v for k, v in (metadata or ()) if isinstance(v, str)}
    service, _, name = method.lstrip("/").partition("/")
    with tracer.start_as_current_span(
            method.lstrip("/"), context=propagate.extract(carrier), kind=trace.SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name,
                        "pipeserve.request_id": request_id},
            record_exception=False, set_status_on_exception=False) as span:
        context = span.get_span_context()
        token = trace_ids_var.set((trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id))
                                  if context.is_valid else None)
        try:
            yield span
        finally:
            # A stream closed from another context (garbage collection) cannot reset: its
            # task, the one context that holds the ids, ends with the call anyway.
            with contextlib.suppress(ValueError):
                trace_ids_var.reset(token)


def finish_span(span: Any | None, code_name: str, code_value: int) -> None:
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("rpc.grpc.status_code", code_value)
    if code_value != 0:
        span.set_status(Status(StatusCode.ERROR, code_name))
