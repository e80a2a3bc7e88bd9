"""pipeserve's Python client: `Client` (sync) and `AsyncClient` (asyncio), one method per
pipeline task, typed errors carrying the server's ErrorInfo, retries on the documented
retryable failures, and `map()` for many inputs with bounded concurrency.

    from pipeserve_client import Client

    with Client("127.0.0.1:50051") as client:
        for label in client.classify_image("cat.jpg", top_k=3).labels:
            print(label.label, label.score)
"""
from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from ._channel import NO_RETRY, RetryPolicy
    from .aio import AsyncClient
    from .client import Client
    from ._tracing import traceparent
    from .errors import (CallCancelledError, DeadlineExceededError, FailedPreconditionError, InputError,
                         InputFileError, InternalError, InvalidArgumentError, NotFoundError, PermissionDeniedError,
                         PipeserveError, ResourceExhaustedError, StreamInterruptedError, UnauthenticatedError,
                         UnavailableError, UnimplementedError)

# Names are imported on first use (PEP 562), so `pipeserve` (the CLI) can configure grpc's
# logging before grpc is imported.
_HOMES = {"NO_RETRY": "._channel", "RetryPolicy": "._channel", "AsyncClient": ".aio", "Client": ".client",
          "traceparent": "._tracing"}

__all__ = [
    "__version__", "Client", "AsyncClient", "RetryPolicy", "NO_RETRY", "to_dict", "traceparent",
    "PipeserveError", "InputError", "InputFileError", "InvalidArgumentError", "NotFoundError", "FailedPreconditionError",
    "PermissionDeniedError", "UnauthenticatedError", "ResourceExhaustedError", "UnavailableError",
    "StreamInterruptedError", "UnimplementedError", "CallCancelledError", "DeadlineExceededError", "InternalError",
]


def __getattr__(name: str) -> Any:
    if name in _HOMES or name in __all__:
        module = importlib.import_module(_HOMES.get(name, ".errors"), __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def to_dict(message: Any) -> dict[str, Any]:
    """A response message -> plain Python values (field names as in the .proto, enums as
    names), ready for json.dumps. Fields without presence keep their zero values (a segment
    starting at 0.0 s has "start_s": 0.0, an empty list is []); `optional` fields and
    messages that were not set are left out, so "absent" still reads as absent."""
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True, **_zero_values_option())


@functools.cache
def _zero_values_option() -> dict[str, bool]:
    """protobuf 5.26 renamed the option that keeps zero-valued fields (proto3 leaves them out
    of JSON by default); use whichever this protobuf has."""
    import inspect

    from google.protobuf.json_format import MessageToDict

    parameters = inspect.signature(MessageToDict).parameters
    for name in ("always_print_fields_with_no_presence", "including_default_value_fields"):
        if name in parameters:
            return {name: True}
    raise ImportError("this protobuf's MessageToDict cannot keep zero-valued fields")
