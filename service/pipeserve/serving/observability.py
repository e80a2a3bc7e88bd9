"""The telemetry interceptor: for every RPC it fixes the request id (the request's
`request_id` field, else `x-request-id` metadata, else a fresh one written back into the
request so the response echoes it), makes it the logging context, opens an OpenTelemetry span
when tracing is on (its trace and span ids then stamp every log line of the call), records
Prometheus metrics when they are on (pipeserve's own and the standard grpc_server_* ones,
counting streamed messages each way), and writes one access-log line with the final status code. It is the outermost interceptor, so it sees the status the
error interceptor (and authentication) produced."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable

import grpc

from ..bounds import MAX_REQUEST_ID_CHARS, for_log
from .interceptors import wrap_handler
from .logs import request_id_var
from .tracing import finish_span, rpc_span

if TYPE_CHECKING:  # prometheus_client is imported only by servers that serve metrics
    from .metrics import Metrics

log = logging.getLogger("pipeserve.access")

# The grpc_type label of go-grpc-prometheus, by (request streaming, response streaming).
GRPC_TYPES = {(False, False): "unary", (True, False): "client_stream", (False, True): "server_stream",
              (True, True): "bidi_stream"}
# Probes and discovery: always open, logged at DEBUG only (kubelet checks every few seconds).
OPEN_PREFIXES = ("/grpc.health.", "/grpc.reflection.")


def metadata_value(metadata: Any, key: str) -> str:
    for k, v in metadata or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("utf-8", "replace")
    return ""


def error_reason(context: grpc.aio.ServicerContext) -> str:
    """The ErrorInfo reason of an aborted call, read back from its trailing status details."""
    raw = metadata_value_bytes(context.trailing_metadata(), "grpc-status-details-bin")
    if not raw:
        return ""
    from google.rpc import error_details_pb2, status_pb2

    try:
        status = status_pb2.Status.FromString(raw)
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                return info.reason
    except Exception:  # noqa: BLE001 - a reason is nice to have, never worth failing over
        return ""
    return ""


def metadata_value_bytes(metadata: Any, key: str) -> bytes:
    for k, v in metadata or ():
        if k == key:
            return v if isinstance(v, bytes) else v.encode()
    return b""


class TelemetryInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, *, metrics: Metrics | None, tracer: Any | None, tasks: dict[str, str],
                 default_model: Callable[[str], str | None] = lambda task: None) -> None:
        """`tasks`: full service name -> task name ("" for services that serve none);
        `default_model(task)`: the model a request naming none is served by."""
        self.metrics = metrics
        self.tracer = tracer
        self.tasks = tasks
        self.default_model = default_model

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        service, _, name = method.lstrip("/").partition("/")
        task = self.tasks.get(service, "")
        quiet = method.startswith(OPEN_PREFIXES)
        this = self
        grpc_labels = (GRPC_TYPES[(bool(handler.request_streaming), bool(handler.response_streaming))], service, name)

        class Call:
            """What one RPC records when it ends."""

            def __init__(self, request: Any, context: grpc.aio.ServicerContext) -> None:
                self.context = context
                # Read now: context.peer() on a call that was already cancelled crashes grpc's
                # Cython layer (it reads the freed call), so never call it at the end.
                self.peer = context.peer()
                self.started = time.perf_counter()
                self.first_at: float | None = None
                self.model = ""
                rid = ""
                if hasattr(request, "DESCRIPTOR"):  # unary request: read its fields
                    fields = request.DESCRIPTOR.fields_by_name
                    if "model" in fields and fields["model"].type == fields["model"].TYPE_STRING:
                        self.model = request.model
                    if "request_id" in fields:
                        rid = request.request_id
                rid = rid or metadata_value(context.invocation_metadata(), "x-request-id") or uuid.uuid4().hex
                if hasattr(request, "DESCRIPTOR") and "request_id" in request.DESCRIPTOR.fields_by_name \
                        and not request.request_id:
                    request.request_id = rid  # the servicer echoes it, so logs and response agree
                self.request_id = rid
                # Logs and spans quote the id bounded; an id too long or with control characters
                # is refused with INVALID_REQUEST_ID by the error interceptor.
                request_id_var.set(for_log(rid, MAX_REQUEST_ID_CHARS))  # own task per RPC: no reset
                if this.metrics is not None:
                    this.metrics.in_flight.labels(service, name).inc()
                    this.metrics.grpc_started.labels(*grpc_labels).inc()
                    if hasattr(request, "DESCRIPTOR"):
                        this.metrics.grpc_received.labels(*grpc_labels).inc()

            def counted(self, requests: Any) -> Any:
                """A streamed request with each message counted as it arrives (unary requests
                were counted on arrival). A reader/writer behaviour (context.read/write, as
                grpc_health's Watch) bypasses the iterators: its messages are not counted."""
                if this.metrics is None or not hasattr(requests, "__aiter__"):
                    return requests
                received = this.metrics.grpc_received.labels(*grpc_labels)

                async def each():
                    async for message in requests:
                        received.inc()
                        yield message
                return each()

            def sent(self) -> None:
                if this.metrics is not None:
                    this.metrics.grpc_sent.labels(*grpc_labels).inc()

            def finish(self, code: grpc.StatusCode, span: Any) -> None:
                elapsed = time.perf_counter() - self.started
                code_name = code.name
                finish_span(span, code_name, code.value[0])
                reason = error_reason(self.context) if code is not grpc.StatusCode.OK else ""
                m = this.metrics
                if m is not None:
                    m.in_flight.labels(service, name).dec()
                    m.requests.labels(service, name, code_name).inc()
                    m.grpc_handled.labels(*grpc_labels, code_name).inc()
                    m.grpc_handling.labels(*grpc_labels).observe(elapsed)
                    if code is not grpc.StatusCode.OK:
                        m.errors.labels(service, name, code_name, reason).inc()
                    if not quiet:
                        model = m.model_label(self.model or (this.default_model(task) or "" if task else ""))
                        m.latency.labels(task, model, name).observe(elapsed)
                        if self.first_at is not None:
                            m.first_result.labels(task, model, name).observe(self.first_at - self.started)
                # Failures at INFO, successes and probes at DEBUG (log_level=debug shows every call):
                # an INFO line per successful call would cost more than a tiny model's forward.
                level = logging.DEBUG if quiet or code is grpc.StatusCode.OK else logging.INFO
                log.log(level, "%s %s %.1fms", method, code_name, elapsed * 1000,
                        extra={"grpc_method": method, "grpc_code": code_name, "duration_ms": round(elapsed * 1000, 3),
                               "model": for_log(self.model), "reason": reason, "peer": self.peer})

        def outcome(context: grpc.aio.ServicerContext, exc: BaseException | None) -> grpc.StatusCode:
            if exc is None or isinstance(exc, grpc.aio.AbortError):
                return context.code() or (grpc.StatusCode.OK if exc is None else grpc.StatusCode.UNKNOWN)
            if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                remaining = context.time_remaining()
                return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0.01 \
                    else grpc.StatusCode.CANCELLED
            return grpc.StatusCode.UNKNOWN

        def unary(behavior):
            async def wrapped(request, context):
                call = Call(request, context)
                with rpc_span(this.tracer, method, context.invocation_metadata(), request_id_var.get()) as span:
                    try:
                        response = await behavior(call.counted(request), context)
                    except BaseException as exc:
                        call.finish(outcome(context, exc), span)
                        raise
                    code = outcome(context, None)
                    if response is not None and code is grpc.StatusCode.OK:  # None: a reader/writer
                        call.sent()                                           # behaviour wrote its own
                    call.finish(code, span)
                    return response
            return wrapped

        def stream(behavior):
            async def wrapped(request, context):
                call = Call(request, context)
                with rpc_span(this.tracer, method, context.invocation_metadata(), request_id_var.get()) as span:
                    try:
                        async for item in behavior(call.counted(request), context):
                            if call.first_at is None:
                                call.first_at = time.perf_counter()
                            call.sent()
                            yield item
                    except BaseException as exc:
                        call.finish(outcome(context, exc), span)
                        raise
                    call.finish(outcome(context, None), span)
            return wrapped

        return wrap_handler(handler, unary, stream)
