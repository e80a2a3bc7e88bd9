"""Typed exceptions: one class per gRPC status the server documents (protos/pipeserve/v1/
common.proto), each carrying the google.rpc.ErrorInfo reason and metadata the server attached,
plus InputError for inputs the client cannot read before anything is sent."""
from __future__ import annotations

from typing import Any

import grpc

ERROR_DOMAIN = "pipeserve.dev"
_DETAILS_KEY = "grpc-status-details-bin"


class PipeserveError(Exception):
    """Base of every error this package raises.

    `code` is the gRPC status (None for errors raised before a call was made), `reason` the
    ErrorInfo reason such as "QUEUE_FULL" ("" when the server sent none), `metadata` the
    ErrorInfo metadata such as {"model": ..., "retry_after_ms": ...}, `details` the server's
    message. `index` is the position of the failed input when a call on a list of inputs
    failed (None for a call on one input)."""

    code: grpc.StatusCode | None = None
    index: int | None = None

    def __init__(self, details: str, *, code: grpc.StatusCode | None = None, reason: str = "",
                 metadata: dict[str, str] | None = None, method: str = "") -> None:
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code
        self.reason = reason
        self.metadata = dict(metadata or {})
        self.method = method

    @property
    def retryable(self) -> bool:
        """Whether common.proto documents the failure as safe to retry."""
        return is_retryable(self.code, self.reason)

    def __str__(self) -> str:
        parts = [self.details] if self.index is None else [f"input {self.index}: {self.details}"]
        if self.code is not None:
            parts.append(f"[{self.code.name}{' ' + self.reason if self.reason else ''}]")
        return " ".join(parts)


class InputError(PipeserveError, ValueError):
    """An input could not be read or converted on the client (missing file, unknown type,
    raw samples without a sampling rate); nothing was sent."""


class InputFileError(InputError):
    """A local input file does not exist or cannot be read."""


class InvalidArgumentError(PipeserveError):
    """INVALID_ARGUMENT: bad input or option (reasons INVALID_INPUT, INPUT_TOO_LARGE,
    UNSUPPORTED_FORMAT, INVALID_PARAMETER)."""
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(PipeserveError):
    """NOT_FOUND: the model is not loaded or cannot be found (MODEL_NOT_FOUND)."""
    code = grpc.StatusCode.NOT_FOUND


class FailedPreconditionError(PipeserveError):
    """FAILED_PRECONDITION: the model serves another task (WRONG_TASK) or failed to load
    (MODEL_LOAD_FAILED)."""
    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDeniedError(PipeserveError):
    """PERMISSION_DENIED: a URI outside the allowlist (URI_NOT_ALLOWED) or a forbidden call."""
    code = grpc.StatusCode.PERMISSION_DENIED


class UnauthenticatedError(PipeserveError):
    """UNAUTHENTICATED: missing or invalid credentials."""
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhaustedError(PipeserveError):
    """RESOURCE_EXHAUSTED: QUEUE_FULL (retryable), OUT_OF_MEMORY or MEMORY_BUDGET (not)."""
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(PipeserveError):
    """UNAVAILABLE: the server cannot be reached, is draining (DRAINING), or went away."""
    code = grpc.StatusCode.UNAVAILABLE


class StreamInterruptedError(UnavailableError):
    """The connection was lost after a stream had delivered `received` messages; the
    messages already yielded are valid, the rest never arrived."""

    def __init__(self, details: str, *, received: int = 0, **kwargs: Any) -> None:
        super().__init__(details, **kwargs)
        self.received = received

    @property
    def retryable(self) -> bool:
        # Retrying would repeat the messages already delivered; the caller decides.
        return False


class UnimplementedError(PipeserveError):
    """UNIMPLEMENTED: the server does not implement this task or RPC (TASK_NOT_IMPLEMENTED)."""
    code = grpc.StatusCode.UNIMPLEMENTED


class CallCancelledError(PipeserveError):
    """CANCELLED: the call was cancelled."""
    code = grpc.StatusCode.CANCELLED


class DeadlineExceededError(PipeserveError):
    """DEADLINE_EXCEEDED: the deadline passed before the call finished."""
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class InternalError(PipeserveError):
    """INTERNAL, UNKNOWN, DATA_LOSS or any other status: the server failed unexpectedly."""
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[PipeserveError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.CANCELLED: CallCancelledError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def is_retryable(code: grpc.StatusCode | None, reason: str) -> bool:
    """common.proto: UNAVAILABLE always; RESOURCE_EXHAUSTED only with reason QUEUE_FULL."""
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and reason == "QUEUE_FULL"


def _error_info(trailing: Any) -> tuple[str, dict[str, str]]:
    """(reason, metadata) of the google.rpc.ErrorInfo in the status-details trailer."""
    from google.rpc import error_details_pb2, status_pb2

    for key, value in trailing or ():
        if key != _DETAILS_KEY:
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
        except Exception:  # a malformed trailer is no reason to hide the status itself
            return "", {}
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
                return info.reason, dict(info.metadata)
    return "", {}


def from_rpc_error(error: grpc.RpcError, method: str = "", *, received: int = 0) -> PipeserveError:
    """The typed exception for a failed call (sync grpc.RpcError or grpc.aio.AioRpcError)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else "") or str(code)
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    reason, metadata = _error_info(trailing)
    if received and code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) \
            and not reason:
        return StreamInterruptedError(details, received=received, code=grpc.StatusCode.UNAVAILABLE,
                                      reason=reason, metadata=metadata, method=method)
    cls = _BY_CODE.get(code, InternalError)
    return cls(details, code=code, reason=reason, metadata=metadata, method=method)
