"""pipeserve's Python client: `Client` (sync) and `AsyncClient` (asyncio), one method per
pipeline task, typed errors carrying the server's ErrorInfo, retries on the documented
retryable failures, and `map()` for many inputs with bounded concurrency.

    from pipeserve_client import Client

    with Client("127.0.0.1:50051") as client:
        for label in client.classify_image("cat.jpg", top_k=3).labels:
            print(label.label, label.score)
"""
from __future__ import annotations

from typing import Any

from ._channel import NO_RETRY, RetryPolicy
from .aio import AsyncClient
from .client import Client
from .errors import (CallCancelledError, DeadlineExceededError, FailedPreconditionError, InputError, InputFileError, InternalError,
                     InvalidArgumentError, NotFoundError, PermissionDeniedError, PipeserveError,
                     ResourceExhaustedError, StreamInterruptedError, UnauthenticatedError, UnavailableError,
                     UnimplementedError)

__all__ = [
    "Client", "AsyncClient", "RetryPolicy", "NO_RETRY", "to_dict",
    "PipeserveError", "InputError", "InputFileError", "InvalidArgumentError", "NotFoundError", "FailedPreconditionError",
    "PermissionDeniedError", "UnauthenticatedError", "ResourceExhaustedError", "UnavailableError",
    "StreamInterruptedError", "UnimplementedError", "CallCancelledError", "DeadlineExceededError", "InternalError",
]


def to_dict(message: Any) -> dict[str, Any]:
    """A response message -> plain Python values (field names as in the .proto, enums as
    names, unset optional fields left out), ready for json.dumps."""
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True)
