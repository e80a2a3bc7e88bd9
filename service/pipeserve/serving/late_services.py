"""Service handlers bound after the server listens. The server starts answering (health,
reflection) before it imports its servicers and torch, which take most of a cold start
(issue #16); until a service's handlers are bound, its methods exist but refuse each call
with the error the placeholder is given (UNAVAILABLE/STARTING), so a client sees a server that
is starting rather than UNIMPLEMENTED or a refused connection.

grpc.aio fixes its handlers when it starts; one generic handler registered then looks the
method up in a table filled later, so servicer modules register into it as into a server.
"""
from __future__ import annotations

from typing import Callable, Iterable

import grpc

from ..errors import PipeserveError


def refusing_handlers(service_name: str, error: Callable[[str], PipeserveError]) -> dict[str, grpc.RpcMethodHandler]:
    """A handler for every method of `service_name` (full name, from the descriptor pool) of
    the method's streaming kind, raising `error(method_name)`; the error interceptor turns
    that into its status. Requests are not parsed (no deserializer): nothing reads them."""
    from google.protobuf import descriptor_pool

    service = descriptor_pool.Default().FindServiceByName(service_name)

    def behaviour(method_name: str):
        async def unary(request, context):
            raise error(method_name)

        async def streaming(request, context):
            raise error(method_name)
            yield  # pragma: no cover - makes this an async generator

        return unary, streaming

    handlers = {}
    for method in service.methods:
        unary, streaming = behaviour(method.name)
        passthrough = dict(request_deserializer=None, response_serializer=lambda m: m.SerializeToString())
        if method.client_streaming and method.server_streaming:
            handler = grpc.stream_stream_rpc_method_handler(streaming, **passthrough)
        elif method.client_streaming:
            handler = grpc.stream_unary_rpc_method_handler(unary, **passthrough)
        elif method.server_streaming:
            handler = grpc.unary_stream_rpc_method_handler(streaming, **passthrough)
        else:
            handler = grpc.unary_unary_rpc_method_handler(unary, **passthrough)
        handlers[f"/{service_name}/{method.name}"] = handler
    return handlers


class LateServices(grpc.GenericRpcHandler):
    """One generic handler for the services in `names`: placeholders refusing every call
    (`error`) until `add_registered_method_handlers` / `add_generic_rpc_handlers` (the calls
    generated `add_*Servicer_to_server` functions make on a server) bind the real ones."""

    def __init__(self, names: Iterable[str], error: Callable[[str], PipeserveError]) -> None:
        self._methods: dict[str, grpc.RpcMethodHandler] = {}
        for name in names:
            self._methods.update(refusing_handlers(name, error))
        self._generic: list[grpc.GenericRpcHandler] = []

    def service(self, handler_call_details):
        handler = self._methods.get(handler_call_details.method)
        if handler is not None:
            return handler
        for generic in self._generic:
            handler = generic.service(handler_call_details)
            if handler is not None:
                return handler
        return None

    # -- the server interface the generated registration functions use ------------------
    def add_registered_method_handlers(self, service_name: str, method_handlers: dict) -> None:
        for method, handler in method_handlers.items():
            self._methods[f"/{service_name}/{method}"] = handler

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        for handler in handlers:
            # A whole service's generic handler replaces its placeholders (older generated code).
            names = getattr(handler, "service_name", lambda: None)()
            if names:
                for method in [m for m in self._methods if m.startswith(f"/{names}/")]:
                    del self._methods[method]
            self._generic.append(handler)

    def bind(self, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        """Binds ready-made handlers by full method name ("/pkg.Service/Method")."""
        self._methods.update(handlers)
