"""Helpers for gRPC tests: a real pipeserve server on a free port (in-process, on its own
event-loop thread), reached through a real channel, plus LoadModel and ErrorInfo helpers."""
from __future__ import annotations

import asyncio
import threading

import grpc


class ServerHandle:
    """A running server: its address, a sync channel to it, and a way to run coroutines on
    its loop (for tests that inspect the manager)."""

    def __init__(self, settings, preload_defaults: bool = False):
        from pipeserve import server as server_module

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="pipeserve-test-server")
        self.thread.start()
        self.running = self.call(server_module.start(settings, preload_defaults=preload_defaults))
        self.address = f"127.0.0.1:{self.running.port}"
        self.channel = grpc.insecure_channel(self.address, options=[
            ("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)])

    def call(self, coroutine, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def manager(self):
        return self.running.app.manager

    def stop(self) -> None:
        self.channel.close()
        self.call(self.running.drain_and_stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def make_server(**overrides) -> ServerHandle:
    from pipeserve.config import Settings

    # Many task tests name a checkpoint directory in their requests and rely on it loading on
    # demand (with auth off): "any" keeps that; the security tests pass their own value.
    settings = Settings(listen="127.0.0.1:0", embedded_defaults=False,
                        on_demand_loading="any").replace(**overrides)
    return ServerHandle(settings)


def load_model(handle: ServerHandle, path, **fields):
    """LoadModel over the channel; returns the ModelInfo."""
    from pipeserve.v1 import model_pb2, model_pb2_grpc

    stub = model_pb2_grpc.ModelServiceStub(handle.channel)
    return stub.LoadModel(model_pb2.LoadModelRequest(model=str(path), **fields), timeout=300).model


def error_reason(error: grpc.RpcError) -> str:
    """The google.rpc.ErrorInfo reason carried by a failed call."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)
    if status is None:
        return ""
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""
