"""Server-sent events: the `data: ...` framing, and reading a gRPC server stream so that its
first message (or its refusal) is known before the HTTP answer commits to 200."""
from __future__ import annotations

import json

import grpc


def event(payload: dict | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


async def first(call):
    """The first message of a server stream (None if it ended empty); raises the call's error,
    so a request the server refuses is answered with its status before the 200 of a stream."""
    message = await call.read()
    return None if message is grpc.aio.EOF else message


async def chain(first, call):
    """`first`, then the rest of the stream (read() throughout: grpc.aio allows one way of reading)."""
    message = first
    while message is not None and message is not grpc.aio.EOF:
        yield message
        message = await call.read()
