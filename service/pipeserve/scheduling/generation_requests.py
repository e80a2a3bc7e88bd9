"""A text-generation request while the engine serves it: the caller's `RequestHandle` (its event
stream, iterated synchronously by worker threads or with `async for` by grpc.aio servicers), the
events it yields (`TokenEvent` per token, `DoneEvent` per sequence, then the end), the finish
reasons, and `Sequence`, the per-sequence state that the scheduler, the step runner and the
output processor share (each reads it; each writes only its own fields, listed on the class).
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .generation import GenerationParams, TextStream, TokenChooser

FINISH_LENGTH, FINISH_EOS, FINISH_STOP, FINISH_CANCELLED = "length", "eos_token", "stop_sequence", "cancelled"


@dataclass
class TokenEvent:
    index: int  # sequence index within the request
    token: int
    text: str
    logprob: float = 0.0
    special: bool = False
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class DoneEvent:
    index: int
    finish_reason: str
    generated_tokens: int
    text: str
    tokens: list[TokenEvent] = field(default_factory=list)


_END = object()


class RequestHandle:
    """A submitted request's event stream. Thread-safe; cancel() may come from any thread.
    The engine's thread is the only producer: put() an event or an exception, end() once."""

    def __init__(self, prompt_ids: list[int], params: GenerationParams):
        self.prompt_ids = prompt_ids
        self.params = params
        self.cancelled = threading.Event()
        self.submitted_at = time.perf_counter()
        self.started_at: float | None = None
        self.compute_s = 0.0
        self.max_batch = 0
        try:
            self._loop = asyncio.get_running_loop()
            self._async_queue: asyncio.Queue | None = asyncio.Queue()
        except RuntimeError:
            self._loop, self._async_queue = None, None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # Events for an event-loop consumer are handed over in bunches: one loop wake-up per
        # bunch, not per token, when the loop is busier than the engine.
        self._lock = threading.Lock()
        self._pending: list[Any] = []
        self._wake_scheduled = False

    def cancel(self) -> None:
        self.cancelled.set()

    def put(self, item: TokenEvent | DoneEvent | BaseException) -> None:
        """Hands one event (or the exception that ends the stream) to the consumer."""
        self._put(item)

    def end(self) -> None:
        """Ends the stream: the consumer's iteration stops after what was put before."""
        self._put(_END)

    def _put(self, item: Any) -> None:
        if self._loop is None:
            self._queue.put(item)
            return
        with self._lock:
            self._pending.append(item)
            if self._wake_scheduled:
                return
            self._wake_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the caller's event loop is gone: nobody listens any more
            self.cancel()

    def _deliver(self) -> None:  # on the consumer's event loop
        with self._lock:
            items, self._pending, self._wake_scheduled = self._pending, [], False
        for item in items:
            self._async_queue.put_nowait(item)

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def __aiter__(self):
        return self._aiter()

    async def _aiter(self):
        while True:
            item = await self._async_queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


@dataclass(eq=False)  # identity: two sequences with equal fields are still two sequences
class Sequence:
    """One sequence of a request (num_return_sequences gives several).

    Written by the scheduler: slot, reserved. By the step runner: decoding (its prompt has been
    passed through the model). By the output processor: ids, last, generated, tokens, text."""
    handle: RequestHandle
    index: int
    slot: int
    chooser: TokenChooser
    text: TextStream
    ids: list[int]
    reserved: int = 0
    last: int = -1
    generated: int = 0
    tokens: list[TokenEvent] = field(default_factory=list)
    decoding: bool = False  # False while its prompt is still being passed through the model

    @property
    def params(self) -> GenerationParams:
        return self.handle.params
