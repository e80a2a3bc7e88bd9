"""Typed errors raised anywhere below the servicers; the error interceptor maps them to a
gRPC status with a google.rpc.ErrorInfo detail (domain "pipeserve.dev", UPPER_SNAKE reason).

Retryable by clients: UNAVAILABLE (always) and RESOURCE_EXHAUSTED with reason QUEUE_FULL
(after backoff). Nothing else is safe to retry blindly.
"""
from __future__ import annotations

import grpc

from .bounds import MAX_ERROR_MESSAGE_BYTES, MAX_METADATA_BYTES, MAX_METADATA_VALUE_BYTES, shorten_utf8

ERROR_DOMAIN = "pipeserve.dev"


class PipeserveError(Exception):
    """Base: a status code, a machine-readable reason and a human message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL_ERROR"

    def __init__(self, message: str, *, reason: str | None = None, metadata: dict[str, str] | None = None):
        # Messages and metadata often quote what the client sent: bounded here, whatever the
        # raiser checked, so every error reaches the client with its code and reason.
        message = shorten_utf8(str(message), MAX_ERROR_MESSAGE_BYTES)
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = bounded_metadata(metadata or {})


class InvalidInput(PipeserveError):
    """The request's data cannot be used (corrupt bytes, empty input, NaN samples...)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_INPUT"


class InvalidParameter(PipeserveError):
    """A request option is out of range or combined with one it excludes."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_PARAMETER"


class InputTooLarge(PipeserveError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INPUT_TOO_LARGE"


class UnsupportedFormat(PipeserveError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "UNSUPPORTED_FORMAT"


class ModelNotFound(PipeserveError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "MODEL_NOT_FOUND"


class WrongTask(PipeserveError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "WRONG_TASK"


class ModelLoadFailed(PipeserveError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "MODEL_LOAD_FAILED"


class UriNotAllowed(PipeserveError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "URI_NOT_ALLOWED"


class QueueFull(PipeserveError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "QUEUE_FULL"


class OutOfMemory(PipeserveError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "OUT_OF_MEMORY"


class MemoryBudgetExceeded(PipeserveError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "MEMORY_BUDGET"


class Draining(PipeserveError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "DRAINING"


class Starting(PipeserveError):
    """The server is still loading its default models: retry shortly (or on another replica)."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "STARTING"


class TaskNotImplemented(PipeserveError):
    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "TASK_NOT_IMPLEMENTED"


class Unauthenticated(PipeserveError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(PipeserveError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


RETRYABLE = {(grpc.StatusCode.UNAVAILABLE, None), (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL")}


def bounded_metadata(metadata: dict) -> dict[str, str]:
    """ErrorInfo metadata with each value (and key) bounded, and entries past the total bound
    left out: the trailer always fits."""
    out: dict[str, str] = {}
    total = 0
    for key, value in metadata.items():
        key = shorten_utf8(str(key), 64)
        value = shorten_utf8(str(value), MAX_METADATA_VALUE_BYTES)
        size = len(key.encode("utf-8", "surrogatepass")) + len(value.encode("utf-8", "surrogatepass"))
        if total + size > MAX_METADATA_BYTES:
            break
        out[key] = value
        total += size
    return out


def to_rpc_status(error: PipeserveError):
    """A google.rpc.Status carrying ErrorInfo, ready for grpc_status.rpc_status.to_status.
    Message and metadata are bounded again here: a raiser may have set them after __init__."""
    from google.protobuf import any_pb2
    from google.rpc import error_details_pb2, status_pb2

    info = error_details_pb2.ErrorInfo(reason=shorten_utf8(error.reason, 64), domain=ERROR_DOMAIN,
                                       metadata=bounded_metadata(error.metadata))
    detail = any_pb2.Any()
    detail.Pack(info)
    return status_pb2.Status(code=error.code.value[0], message=shorten_utf8(error.message, MAX_ERROR_MESSAGE_BYTES),
                             details=[detail])
