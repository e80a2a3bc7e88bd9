"""One interceptor maps what handlers raise to a gRPC status with google.rpc.ErrorInfo:
typed PipeserveErrors keep their code and reason, device OOM becomes RESOURCE_EXHAUSTED, and
anything unexpected becomes INTERNAL without a traceback leaking to the client."""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from typing import Callable

import grpc
from grpc_status import rpc_status

from google.protobuf.message import DecodeError

from ..bounds import request_id_problem
from ..errors import InvalidInput, OutOfMemory, PipeserveError, to_rpc_status
from .drain import Drain
from .startup import Startup

log = logging.getLogger("pipeserve.errors")


def _as_pipeserve_error(exc: BaseException, method: str) -> PipeserveError:
    if isinstance(exc, PipeserveError):
        return exc
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return OutOfMemory("the device ran out of memory for this request; retry with a smaller input")
    log.exception("unexpected error in %s", method, exc_info=exc)
    return PipeserveError(f"internal error in {method}: {type(exc).__name__}")


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    error = _as_pipeserve_error(exc, method)
    await context.abort_with_status(rpc_status.to_status(to_rpc_status(error)))


_PASS_THROUGH = (asyncio.CancelledError, grpc.aio.AbortError)


def wrap_handler(handler: grpc.RpcMethodHandler, unary: Callable, stream: Callable,
                 request_deserializer: Callable | None = None) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour wrapped: `unary(behavior)` for single-response
    methods, `stream(behavior)` for server-streaming ones (and, if given, another deserializer).

    A server-streaming behaviour may also be a coroutine function that sends with
    `context.write` and returns None (grpc's reader/writer API; grpc_health's Watch is one):
    grpc.aio tells the two apart by the function's kind, so such a behaviour is wrapped as a
    coroutine (`unary`), which awaits it, and the wrapper keeps its kind."""
    ser = dict(request_deserializer=request_deserializer or handler.request_deserializer,
               response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **ser)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **ser)
    if handler.unary_stream:
        behavior = handler.unary_stream
        wrap = unary if inspect.iscoroutinefunction(behavior) else stream
        return grpc.unary_stream_rpc_method_handler(wrap(behavior), **ser)
    behavior = handler.stream_stream
    wrap = unary if inspect.iscoroutinefunction(behavior) else stream
    return grpc.stream_stream_rpc_method_handler(wrap(behavior), **ser)


class _Undecodable:
    """Bytes the request type could not parse (most often a string field that is not valid
    UTF-8). grpc would answer UNKNOWN from inside its own deserializer; the handler answers
    INVALID_ARGUMENT instead."""

    def __init__(self, error: DecodeError):
        self.error = error


def _lenient(deserialize):
    if deserialize is None:
        return None

    def parse(data: bytes):
        try:
            return deserialize(data)
        except DecodeError as exc:
            return _Undecodable(exc)
    return parse


def _checked(request):
    if isinstance(request, _Undecodable):
        raise InvalidInput(f"the request is not a valid protobuf message ({request.error}); "
                           "string fields must be valid UTF-8", reason="MALFORMED_REQUEST")
    _check_request_id(request)
    return request


def _check_request_id(request) -> None:
    """Refuses a request id that is too long or holds control characters, before the servicer
    does any work (the telemetry interceptor may have copied it from x-request-id metadata).
    A streamed request carries its id in its first message's config: one level down counts."""
    descriptor = getattr(request, "DESCRIPTOR", None)
    if descriptor is None:
        return
    if "request_id" in descriptor.fields_by_name:
        _refuse_bad_request_id(request.request_id)
    for field, value in request.ListFields():
        if field.message_type is not None and "request_id" in field.message_type.fields_by_name \
                and not is_repeated(field):
            _refuse_bad_request_id(value.request_id)


def is_repeated(field) -> bool:
    """Whether a protobuf field descriptor is repeated (the security interceptor's enum check uses it too)."""
    if hasattr(field, "is_repeated"):  # protobuf >= 5.28; `label` is deprecated there
        return field.is_repeated
    return field.label == field.LABEL_REPEATED


def _refuse_bad_request_id(rid) -> None:
    problem = request_id_problem(rid) if isinstance(rid, str) else None
    if problem:
        raise InvalidInput(f"{problem}: send a short printable id, or none", reason="INVALID_REQUEST_ID")


async def _checked_stream(requests):
    async for request in requests:
        yield _checked(request)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, drain: Drain | None = None, startup: Startup | None = None):
        self._drain = drain or Drain()
        self._startup = startup or Startup((), starting=False)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        drain = self._drain
        health = method.startswith("/grpc.health") or method.startswith("/grpc.reflection")
        startup = self._startup

        # Probes and discovery stay open while draining (and a Watch never holds a drain up).
        def admit():
            if health:
                return contextlib.nullcontext()
            startup.check(method)
            return drain.admit()

        def checked(request):
            return _checked_stream(request) if hasattr(request, "__aiter__") else _checked(request)

        def unary_response(behavior):
            async def wrapped(request, context):
                try:
                    with admit():
                        return await behavior(checked(request), context)
                except _PASS_THROUGH:
                    raise
                except Exception as exc:
                    await _abort(context, exc, method)
            return wrapped

        def stream_response(behavior):
            async def wrapped(request, context):
                try:
                    with admit():
                        async for item in behavior(checked(request), context):
                            yield item
                except _PASS_THROUGH:
                    raise
                except Exception as exc:
                    await _abort(context, exc, method)
            return wrapped

        return wrap_handler(handler, unary_response, stream_response, _lenient(handler.request_deserializer))
