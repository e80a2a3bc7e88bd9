"""Starts and stops the HTTP front door on the server's event loop.

Each HTTP request becomes a call on the server's own gRPC services through a loopback
grpc.aio channel on a unix socket in a private (0700) folder, rather than calling the servicer
objects in-process: a servicer method expects a grpc ServicerContext, and the interceptors
around it (auth, stream limits, enum and model-name checks, draining, telemetry, the error
mapping with ErrorInfo) would all have to be re-run by hand, and kept in step as they change.
Through the channel they apply unchanged, and a cancelled HTTP request cancels its call. The
price is one protobuf encode/decode per request, microseconds beside a model's forward pass.
A unix socket keeps that loopback off the network and out of TLS (the public gRPC port may
demand client certificates the front door does not hold); the HTTP caller's bearer token is
forwarded, so a token's rights are the same on both doors. One consequence: without auth,
every HTTP caller is the same client to `max_streams_per_client` (the socket's peer).
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
from aiohttp import web

from ..config import Settings
from .routes import Routes

log = logging.getLogger("pipeserve.http")


def loopback_address() -> tuple[str, Path]:
    """A unix socket address in a fresh private folder (mkdtemp makes it 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="pipeserve-http-"))
    return f"unix:{folder / 'grpc.sock'}", folder


@dataclass
class FrontDoor:
    runner: web.AppRunner
    channel: grpc.aio.Channel
    folder: Path
    port: int

    async def close(self) -> None:
        await self.runner.cleanup()
        await self.channel.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


async def start(settings: Settings, loopback: str, folder: Path) -> FrontDoor:
    """Serves the endpoints on `settings.http_listen`, calling the gRPC server at `loopback`."""
    channel = grpc.aio.insecure_channel(loopback, options=[
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes)])
    routes = Routes(channel, settings)
    # client_max_size bounds every body aiohttp reads (json, multipart): past it, 413.
    app = web.Application(client_max_size=settings.max_message_bytes, middlewares=[routes.errors])
    routes.install(app)
    # handler_cancellation: a client that goes away cancels its handler, hence its gRPC call.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    listen = settings.http_listen
    if listen.startswith(("unix:", "unix-abstract:")):  # the forms `address()` accepts, as for gRPC
        scheme, _, path = listen.partition(":")
        site = web.UnixSite(runner, "\0" + path if scheme == "unix-abstract" else path)
    else:
        host, port = _split(listen)
        site = web.TCPSite(runner, host, port)
    await site.start()
    address = runner.addresses[0]
    bound = address[1] if isinstance(address, tuple) else 0  # the port asked for, or the free one port 0 found
    log.info("HTTP/JSON (OpenAI-compatible) listening on %s (port %d)", settings.http_listen, bound)
    return FrontDoor(runner=runner, channel=channel, folder=folder, port=bound)
