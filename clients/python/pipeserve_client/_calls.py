"""How both clients make a call: one retry and deadline policy (Attempts) applied by two thin
loops per client kind, which differ only in how they call, iterate and wait (blocking or
awaited). The task methods built on these loops are generated from _methods.py."""
from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Sequence, TypeVar

import grpc

from . import _fanout
from ._channel import NO_RETRY, Connection, RetryPolicy
from ._services import StubCache
from ._tracing import trace_metadata
from .errors import CallCancelledError, PipeserveError, from_rpc_error

R = TypeVar("R")


class Deadline:
    """What is left of a call's overall deadline across its retries (None = no deadline)."""

    def __init__(self, timeout: float | None) -> None:
        self.end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self.end is None else max(0.0, self.end - time.monotonic())

    def allows(self, delay: float, attempt_s: float) -> bool:
        """Whether, after waiting `delay`, at least `attempt_s` of the deadline is left."""
        return self.end is None or time.monotonic() + delay + attempt_s <= self.end


class Attempt:
    """One try of a call. As a context it keeps a gRPC failure as the typed error (`error`)
    instead of raising it, so the policy can decide whether the call goes on."""

    def __init__(self, timeout: float | None, method: str) -> None:
        self.timeout = timeout  # what is left of the call's deadline for this try
        self.method = method
        self.received = 0  # stream messages delivered by this try
        self.error: PipeserveError | None = None

    def __enter__(self) -> "Attempt":
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        if isinstance(exc, grpc.RpcError):
            self.error = from_rpc_error(exc, self.method, received=self.received)
            return True
        return False


class Attempts:
    """The retry and deadline policy of one call, for both clients:

        while True:
            with attempts.next() as attempt:
                return <call with timeout=attempt.timeout>
            self._wait(attempts.backoff())  # await self._wait(...) in AsyncCalls

    backoff() raises the failure when the call must end: not retryable, out of attempts, a
    stream that already delivered messages (never delivered twice), or too little time left
    for another attempt after the wait. next() checks the time again after the wait, which
    can overrun on a busy machine."""

    def __init__(self, policy: RetryPolicy, timeout: float | None, method: str) -> None:
        self.policy = policy
        self.deadline = Deadline(timeout)
        self.method = method
        self.made = 0
        self.last: Attempt | None = None

    def next(self) -> Attempt:
        if self.last is not None and self.last.error is not None \
                and not self.deadline.allows(0.0, self.policy.min_attempt_s):
            raise self.last.error
        self.made += 1
        self.last = Attempt(self.deadline.remaining(), self.method)
        return self.last

    def backoff(self) -> float:
        """The wait before the next attempt; raises the last attempt's error when there is none."""
        assert self.last is not None and self.last.error is not None, "backoff() follows a failed attempt"
        error = self.last.error
        delay = self.policy.backoff_s(self.made - 1, error)
        if self.last.received or not self.policy.should_retry(error, self.made) \
                or not self.deadline.allows(delay, self.policy.min_attempt_s):
            raise error
        return delay


class CallsBase:
    """What Client and AsyncClient share: the connection, default deadline, retry policy,
    how many calls a list of inputs keeps in flight (max_concurrency), and stubs. A subclass
    opens its channel (sync or asyncio) and names its ModelService wrapper."""

    _models: type

    def __init__(self, target: str | None = None, *, timeout: float | None = None, tls: bool | None = None,
                 root_certificates: bytes | str | None = None, client_certificate: bytes | str | None = None,
                 client_key: bytes | str | None = None, server_name: str | None = None, token: str | None = None,
                 retry: RetryPolicy | None = None, max_message_bytes: int | None = None,
                 max_concurrency: int = 8, channel_options: Sequence[tuple[str, Any]] = ()) -> None:
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be an integer of at least 1, got {max_concurrency!r}")
        self.max_concurrency = max_concurrency
        self.connection = Connection.create(target, tls=tls, root_certificates=root_certificates,
                                            client_certificate=client_certificate, client_key=client_key,
                                            server_name=server_name, token=token,
                                            max_message_bytes=max_message_bytes)
        self.target = self.connection.target
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._channel = self._open_channel(tuple(channel_options))
        self._stubs = StubCache(self._channel)
        self._metadata = self.connection.metadata()
        self.models = self._models(self)

    def _open_channel(self, options: tuple[tuple[str, Any], ...]) -> Any:
        raise NotImplementedError

    def _attempts(self, method: str, timeout: float | None, policy: RetryPolicy | None = None) -> Attempts:
        return Attempts(policy or self.retry, self.timeout if timeout is None else timeout, method)

    def _call_metadata(self) -> tuple[tuple[str, str], ...]:
        """The connection's metadata plus the caller's W3C trace context, read per call."""
        return self._metadata + trace_metadata()


class SyncCalls(CallsBase):
    """The blocking loops: unary calls, and streams retried only before their first message."""

    def _wait(self, delay: float) -> None:
        time.sleep(delay)

    def _unary(self, service: str, method: str, request: Any, timeout: float | None) -> Any:
        rpc = self._stubs.method(service, method)
        attempts = self._attempts(method, timeout)
        fan_out = _fanout.FanOut.current()  # set when this call is one input of a list
        while True:
            with attempts.next() as attempt:
                # A future rather than a blocking call, so a failed list can cancel it from
                # another thread.
                call = rpc.future(request, timeout=attempt.timeout, metadata=self._call_metadata())
                if fan_out is None:
                    return call.result()
                fan_out.track(call)
                try:
                    return call.result()
                except grpc.FutureCancelledError:
                    raise CallCancelledError("cancelled: another input of the list failed",
                                             method=method) from None
                finally:
                    fan_out.untrack(call)
            self._wait(attempts.backoff())

    def _each(self, one: Callable[[dict[str, Any]], R], items: Sequence[dict[str, Any]]) -> list[R]:
        """A call on a list of inputs: one(item) per input, max_concurrency at a time."""
        return _fanout.run_all(one, items, self.max_concurrency)

    def _stream(self, service: str, method: str, request: Any, timeout: float | None,
                policy: RetryPolicy | None = None) -> Iterator[Any]:
        """Server-streaming (or, with an iterator of requests, bidirectional) call. Closing the
        iterator early cancels the call, and the server stops."""
        rpc = self._stubs.method(service, method)
        attempts = self._attempts(method, timeout, policy)
        while True:
            with attempts.next() as attempt:
                call = rpc(request, timeout=attempt.timeout, metadata=self._call_metadata())
                try:
                    for message in call:
                        attempt.received += 1
                        yield message
                    return
                finally:
                    call.cancel()  # no-op when the stream completed; stops the server's work otherwise
            self._wait(attempts.backoff())

    def _bidi(self, service: str, method: str, requests: Iterator[Any], timeout: float | None) -> "BidiStream":
        # Never retried: the request iterator cannot be replayed.
        call = self._stubs.method(service, method)(requests, timeout=self.timeout if timeout is None else timeout,
                                                   metadata=self._call_metadata())
        return BidiStream(call, method)


class BidiStream(Iterator[Any]):
    """The responses of a bidirectional call. Unlike a generator, cancel() may be called from
    any thread while another waits for the next message (a bridge relaying a live stream
    cancels it when its own peer goes away); that wait then raises PipeserveError (CANCELLED).
    close() is cancel() (the call stops on the server), so it can be used like a generator."""

    def __init__(self, call: Any, method: str) -> None:
        self._call, self._method, self._received = call, method, 0

    def __iter__(self) -> "BidiStream":
        return self

    def __next__(self) -> Any:
        try:
            message = next(self._call)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self._method, received=self._received) from None
        self._received += 1
        return message

    def cancel(self) -> None:
        self._call.cancel()  # a no-op once the call has ended

    close = cancel

    def __del__(self) -> None:
        self._call.cancel()  # as a generator's `finally` would: an abandoned stream stops


class AsyncCalls(CallsBase):
    """The same loops on a grpc.aio channel: awaited calls, async iteration, asyncio.sleep."""

    async def _wait(self, delay: float) -> None:
        await asyncio.sleep(delay)

    async def _unary(self, service: str, method: str, request: Any, timeout: float | None) -> Any:
        rpc = self._stubs.method(service, method)
        attempts = self._attempts(method, timeout)
        while True:
            with attempts.next() as attempt:
                return await rpc(request, timeout=attempt.timeout, metadata=self._call_metadata())
            await self._wait(attempts.backoff())

    async def _each(self, one: Callable[[dict[str, Any]], Awaitable[R]],
                    items: Sequence[dict[str, Any]]) -> list[R]:
        """A call on a list of inputs: one(item) per input, max_concurrency at a time."""
        return await _fanout.gather_all(one, items, self.max_concurrency)

    async def _stream(self, service: str, method: str, request: Any, timeout: float | None,
                      policy: RetryPolicy | None = None) -> AsyncIterator[Any]:
        rpc = self._stubs.method(service, method)
        attempts = self._attempts(method, timeout, policy)
        while True:
            with attempts.next() as attempt:
                call = rpc(request, timeout=attempt.timeout, metadata=self._call_metadata())
                try:
                    async for message in call:
                        attempt.received += 1
                        yield message
                    return
                finally:
                    call.cancel()
            await self._wait(attempts.backoff())

    def _bidi(self, service: str, method: str, requests: Any, timeout: float | None) -> AsyncIterator[Any]:
        return self._stream(service, method, requests, timeout, NO_RETRY)
