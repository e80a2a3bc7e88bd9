"""A call on a list of inputs, as transformers' pipelines accept one: one call per input, at
most `limit` in flight, results in input order. The first input to fail ends the whole call:
its error is raised, marked with the input's index, and the other calls are cancelled (those
not started never start; those in flight are cancelled on the server too).

The sync client runs the calls on a thread pool; each worker thread knows its FanOut (a
thread-local), so SyncCalls can register the gRPC call it makes and the FanOut can cancel it
from another thread. The asyncio client runs one task per input behind a semaphore, and
cancelling a task cancels its call."""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from .errors import PipeserveError

R = TypeVar("R")
Item = dict[str, Any]  # the arguments of one input's call, by parameter name


def _mark(error: BaseException, index: int) -> BaseException:
    """Says which input failed: PipeserveError.index (shown in its message), or a note on any
    other exception."""
    if isinstance(error, PipeserveError):
        error.index = index
    else:
        error.add_note(f"raised for input {index} of the list")
    return error


class FanOut:
    """The gRPC calls in flight for one call on a list, so they can be cancelled together."""

    _current = threading.local()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: set[Any] = set()
        self.cancelled = False
        self.first_failure: tuple[int, BaseException] | None = None  # (index, error) of the input that failed first

    @classmethod
    def current(cls) -> "FanOut | None":
        return getattr(cls._current, "fan_out", None)

    def track(self, call: Any) -> None:
        """Registers a call made on behalf of an input; cancels it at once if the list failed."""
        with self._lock:
            if not self.cancelled:
                self._calls.add(call)
                return
        call.cancel()

    def untrack(self, call: Any) -> None:
        with self._lock:
            self._calls.discard(call)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            calls, self._calls = list(self._calls), set()
        for call in calls:
            call.cancel()

    def fail(self, index: int, error: BaseException) -> None:
        """Records an input's failure (only the first counts: the others' are the cancellations
        it caused) and cancels the calls still in flight."""
        with self._lock:
            if self.first_failure is None:
                self.first_failure = (index, error)
        self.cancel()

    def run(self, one: Callable[[Item], R], index: int, item: Item) -> R:
        """One input's call on a worker thread. A failure cancels the others before this thread
        takes the next input, and an input whose turn comes after a failure is not sent."""
        if self.cancelled:
            raise _NotStarted()
        FanOut._current.fan_out = self
        try:
            return one(item)
        except BaseException as error:
            self.fail(index, error)
            raise
        finally:
            FanOut._current.fan_out = None


class _NotStarted(Exception):
    """An input skipped because another failed first (never raised to the caller)."""


def run_all(one: Callable[[Item], R], items: Sequence[Item], limit: int) -> list[R]:
    """The sync client's fan-out: one(item) for every item on at most `limit` threads."""
    if not items:
        return []
    fan_out = FanOut()
    with ThreadPoolExecutor(max_workers=min(limit, len(items)), thread_name_prefix="pipeserve-list") as pool:
        futures: list[Future] = [pool.submit(fan_out.run, one, index, item) for index, item in enumerate(items)]
        _, pending = wait(futures, return_when=FIRST_EXCEPTION)
        if fan_out.first_failure is not None:
            for future in pending:
                future.cancel()
            fan_out.cancel()
            index, error = fan_out.first_failure
            raise _mark(error, index)
    return [future.result() for future in futures]


async def gather_all(one: Callable[[Item], Awaitable[R]], items: Sequence[Item], limit: int) -> list[R]:
    """The asyncio client's fan-out: one task per item, at most `limit` awaiting a call."""
    if not items:
        return []
    gate = asyncio.Semaphore(limit)
    first_failure: list[tuple[int, BaseException]] = []

    async def limited(index: int, item: Item) -> R:
        async with gate:
            # Checked and set while holding the gate, so no input starts after a failure.
            if first_failure:
                raise _NotStarted()
            try:
                return await one(item)
            except Exception as error:  # a cancelled task (the caller's or ours) is no failure of its input
                if not first_failure:
                    first_failure.append((index, error))
                raise

    tasks = [asyncio.ensure_future(limited(index, item)) for index, item in enumerate(items)]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        if first_failure:
            index, error = first_failure[0]
            raise _mark(error, index)
        return [task.result() for task in tasks]
    finally:
        # Reached on a failure, or when the caller is cancelled: the other calls stop too.
        unfinished = [task for task in tasks if not task.done()]
        for task in unfinished:
            task.cancel()
        if unfinished:
            await asyncio.gather(*unfinished, return_exceptions=True)
