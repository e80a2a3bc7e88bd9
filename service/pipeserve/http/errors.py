"""gRPC failures -> HTTP answers in OpenAI's error shape, plus pipeserve's ErrorInfo reason:
{"error": {"message", "type", "code", "param", "reason"}}. `code` is the reason in lower case
(OpenAI's codes are lower snake case, e.g. "model_not_found"), `reason` the UPPER_SNAKE one a
gRPC client sees."""
from __future__ import annotations

import json
import math

import grpc
from aiohttp import web

# Which HTTP status each gRPC code becomes (the table of README "HTTP/JSON").
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

# OpenAI's error `type` per HTTP status; anything else 4xx is an invalid request.
_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          429: "rate_limit_error"}

# Seconds a client should wait before retrying a 429 or 503 when the server names no time.
DEFAULT_RETRY_AFTER_S = 1


class HttpError(Exception):
    """A request refused by the front door itself (before any gRPC call)."""

    def __init__(self, status: int, message: str, reason: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.reason, self.param = status, message, reason, param


def invalid(message: str, param: str | None = None, reason: str = "INVALID_PARAMETER") -> HttpError:
    return HttpError(400, message, reason=reason, param=param)


def error_response(status: int, message: str, reason: str, param: str | None = None,
                   retry_after_s: int | None = None) -> web.Response:
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "code": reason.lower() if reason else None,
                      "param": param, "reason": reason or None}}
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return web.json_response(body, status=status, headers=headers, dumps=json.dumps)


def error_info(error: grpc.aio.AioRpcError) -> tuple[str, dict[str, str]]:
    """The ErrorInfo reason and metadata a failed call carries ("" and {} when none)."""
    from google.rpc import error_details_pb2, status_pb2

    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason, dict(info.metadata)
    return "", {}


def from_rpc_error(error: grpc.aio.AioRpcError) -> web.Response:
    code = error.code()
    status = HTTP_STATUS.get(code, 500)
    reason, metadata = error_info(error)
    retry_after = None
    if status in (429, 503):
        retry_ms = metadata.get("retry_after_ms", "")
        retry_after = math.ceil(int(retry_ms) / 1000) if retry_ms.isdigit() else DEFAULT_RETRY_AFTER_S
    return error_response(status, error.details() or code.name, reason or code.name,
                          param=metadata.get("field"), retry_after_s=retry_after)


def sse_error(error: grpc.aio.AioRpcError) -> dict:
    """The error event of a stream that already answered 200: OpenAI's shape in a data line."""
    reason, metadata = error_info(error)
    status = HTTP_STATUS.get(error.code(), 500)
    return {"error": {"message": error.details() or error.code().name,
                      "type": _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
                      "code": (reason or error.code().name).lower(), "param": metadata.get("field"),
                      "reason": reason or error.code().name}}
