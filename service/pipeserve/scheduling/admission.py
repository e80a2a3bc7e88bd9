"""Admission for calls that bypass the dynamic batcher and the generation engine (speech
recognition: Transcribe, TranscribeStream, StreamingTranscribe): per model, at most `running`
calls hold a slot at once, at most `max_waiting` more wait for one in arrival order, and the
next caller is refused at once with QUEUE_FULL (RESOURCE_EXHAUSTED, retryable after backoff),
as the batcher and the engine refuse theirs. Nothing waits unbounded and nothing past the
bound is decoded or buffered: a call takes its slot before it decodes its input.

A caller that leaves while waiting (cancelled, deadline) gives up its place; a caller that
leaves just as a slot was handed to it passes the slot on, so no slot is ever lost.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import AsyncIterator

from ..errors import QueueFull

# What a refused client is told to wait before retrying: about one short call.
RETRY_AFTER_MS = 200


class AdmissionGate:
    """One model's slots and its bounded FIFO of waiters."""

    def __init__(self, name: str, running: int, max_waiting: int) -> None:
        self.name = name
        self.running = max(1, int(running))
        self.max_waiting = max(0, int(max_waiting))
        self.active = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def idle(self) -> bool:
        return self.active == 0 and not self._waiters

    async def acquire(self) -> float:
        """Takes a slot (waiting for one if the queue has room); returns seconds waited."""
        if self.active < self.running and not self._waiters:
            self.active += 1
            return 0.0
        if len(self._waiters) >= self.max_waiting:
            raise QueueFull(f"{self.name}: {self.active} calls are running and {len(self._waiters)} waiting "
                            f"(the limit); retry after a short backoff",
                            metadata={"limit": self.max_waiting, "retry_after_ms": RETRY_AFTER_MS})
        started = time.perf_counter()
        granted = asyncio.get_running_loop().create_future()
        self._waiters.append(granted)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release()  # the slot arrived as we left: hand it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(granted)
            raise
        return time.perf_counter() - started

    def release(self) -> None:
        """Hands the slot to the oldest waiter still waiting, else frees it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves over: `active` is unchanged
                return
        self.active -= 1


class Admission:
    """The gates of every model, made on first use and dropped when idle (so names of
    unloaded models do not accumulate)."""

    def __init__(self, running: int, max_waiting: int) -> None:
        self.running, self.max_waiting = running, max_waiting
        self._gates: dict[tuple[str, int], AdmissionGate] = {}

    def gate(self, name: str, key: int) -> AdmissionGate:
        gate = self._gates.get((name, key))
        if gate is None:
            gate = self._gates[(name, key)] = AdmissionGate(name, self.running, self.max_waiting)
        return gate

    def depth_by_model(self) -> dict[str, tuple[int, int]]:
        """model name -> (running, waiting)."""
        return {name: (g.active, g.waiting) for (name, _), g in self._gates.items()}

    @contextlib.asynccontextmanager
    async def slot(self, name: str, key: int = 0) -> AsyncIterator[float]:
        """Holds one of `name`'s slots for the block; yields the seconds spent waiting."""
        gate = self.gate(name, key)
        try:
            waited = await gate.acquire()
        except BaseException:
            self._forget_if_idle(name, key, gate)
            raise
        try:
            yield waited
        finally:
            gate.release()
            self._forget_if_idle(name, key, gate)

    def _forget_if_idle(self, name: str, key: int, gate: AdmissionGate) -> None:
        if gate.idle and self._gates.get((name, key)) is gate:
            del self._gates[(name, key)]
