"""The asyncio client: the same methods as Client, as coroutines (unary) and async iterators
(streams), on a grpc.aio channel. Both clients' methods come from one description
(_methods.py, through the generated _aio_methods.py); this module adds the connection's
lifecycle and map()."""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, TypeVar

import grpc

from ._aio_methods import AsyncClientMethods, AsyncModels
from .errors import PipeserveError, UnavailableError

__all__ = ["AsyncClient", "AsyncModels"]

T = TypeVar("T")
R = TypeVar("R")


class AsyncClient(AsyncClientMethods):
    """A grpc.aio connection to one pipeserve server; arguments as for Client.

        async with AsyncClient("127.0.0.1:50051") as client:
            async for message in await client.generate("Once upon", stream=True):
                ...
    """

    _models = AsyncModels
    models: AsyncModels  # client.models.list() / get() / load() / unload()

    def _open_channel(self, options: tuple[tuple[str, Any], ...]) -> grpc.aio.Channel:
        return self.connection.aio_channel(options)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_ready(self, timeout: float = 10.0) -> None:
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except asyncio.TimeoutError:
            raise UnavailableError(f"cannot reach the pipeserve server at {self.target} within {timeout:g}s",
                                   code=grpc.StatusCode.UNAVAILABLE) from None

    # --- many inputs ----------------------------------------------------------------------

    async def map(self, fn: Callable[[T], Awaitable[R]], inputs: Iterable[T] | AsyncIterable[T], *,
                  concurrency: int = 8, return_exceptions: bool = False) -> AsyncIterator[R | PipeserveError]:
        """Awaits fn(item) for each input with at most `concurrency` in flight; yields results
        in input order (see Client.map)."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        pending: deque[asyncio.Future] = deque()
        try:
            async for item in _aiter(inputs):
                pending.append(asyncio.ensure_future(fn(item)))
                if len(pending) >= concurrency:
                    yield await _aresult(pending.popleft(), return_exceptions)
            while pending:
                yield await _aresult(pending.popleft(), return_exceptions)
        finally:
            for future in pending:
                future.cancel()


async def _aiter(inputs: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    if hasattr(inputs, "__aiter__"):
        async for item in inputs:  # type: ignore[union-attr]
            yield item
    else:
        for item in inputs:  # type: ignore[union-attr]
            yield item


async def _aresult(future: asyncio.Future, return_exceptions: bool) -> Any:
    try:
        return await future
    except PipeserveError as error:
        if return_exceptions:
            return error
        raise
