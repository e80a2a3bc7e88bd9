"""Dynamic batching for the non-generation tasks: concurrent requests to the same model with
equal options (the task's frozen options value is the grouping key) are queued and run as one
batch, bounded by max batch size. Each queue is bounded; past it callers get QUEUE_FULL.

When to run (as text-embeddings-inference does): a request that finds its model idle runs at
once, alone; requests arriving while one of the model's batches runs wait for it and then go
together as the next batch. Waiting for company on an idle model would only add latency (a
lone call used to sit out the whole max wait: 5.2 ms of a 13 ms ExtractFeatures), while under
load the running batch is what gathers the next one. A batch formed while another batch of the
same model (other options) still runs waits at most `max_wait_ms` for company;
`wait_when_idle` makes every batch wait that long (Triton's fixed queue delay), for callers
that prefer fuller batches to latency.

What runs is the pipeline's `run_batch(items, options) -> list` (pipelines.contracts.
BatchedPipeline), which pads internally, so a batched result equals the unbatched one. If a batch fails with a
typed error (one caller's corrupt input), its items are retried one by one, so that only the
caller at fault sees the error.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from ..errors import PipeserveError, QueueFull
from ..pipelines.contracts import BatchedPipeline
from .manager import ModelEntry, ModelManager


@dataclass
class _Pending:
    item: Any
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatchResult:
    value: Any
    queue_ms: float
    compute_ms: float
    batch_size: int


class _Queue:
    def __init__(self) -> None:
        self.pending: list[_Pending] = []
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task | None = None


class DynamicBatcher:
    def __init__(self, manager: ModelManager, *, max_batch_size: int = 8, max_wait_ms: float = 5.0,
                 max_queue: int = 256):
        self.manager = manager
        self.max_batch_size = max(1, max_batch_size)
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.wait_when_idle = False
        self._queues: dict[tuple, _Queue] = {}
        # Batches running per model pipeline (all its queues): a model with none is idle.
        self._running: dict[int, int] = {}
        # Called as observer(model, method, batch_size, [seconds each item waited]) for every
        # batch formed (pipeserve.serving.metrics records batch sizes and queue time through it).
        self.observer: Callable[[str, str, int, list[float]], None] | None = None

    def depth(self) -> int:
        return sum(len(q.pending) for q in self._queues.values())

    def depth_by_model(self) -> dict[str, int]:
        """Requests waiting per model name (all methods and option sets together)."""
        out: dict[str, int] = {}
        for key, queue in list(self._queues.items()):
            out[key[0]] = out.get(key[0], 0) + len(queue.pending)
        return out

    async def submit(self, entry: ModelEntry, item: Any, options: Hashable) -> BatchResult:
        """Queues one item for `entry.pipeline.run_batch` with `options` (built by the
        pipeline's options(), frozen: equal options share batches); returns its result once
        its batch has run."""
        key = (entry.name, id(entry.pipeline), options)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue()
        if len(queue.pending) >= self.max_queue:
            raise QueueFull(f"{entry.name} has {len(queue.pending)} requests queued; retry after a short backoff",
                            metadata={"retry_after_ms": 50})
        pending = _Pending(item, asyncio.get_running_loop().create_future())
        queue.pending.append(pending)
        queue.wakeup.set()
        if queue.task is None or queue.task.done():
            queue.task = asyncio.get_running_loop().create_task(self._drain(key, queue, entry, options))
        try:
            return await asyncio.shield(pending.future)
        except asyncio.CancelledError:
            # A caller that went away before its batch started costs nothing.
            if pending in queue.pending:
                queue.pending.remove(pending)
            raise

    async def _drain(self, key: tuple, queue: _Queue, entry: ModelEntry, options: Hashable) -> None:
        pipeline: BatchedPipeline = entry.pipeline
        call = pipeline.run_batch
        # The metrics label: the task's method run_batch stands for (classify, answer, ...).
        method = getattr(call, "__name__", "run_batch")
        model = id(entry.pipeline)
        while queue.pending:
            if self.wait_when_idle or self._running.get(model, 0):
                await self._gather(queue)
            batch = queue.pending[: self.max_batch_size]
            del queue.pending[: len(batch)]
            batch = [p for p in batch if not p.future.cancelled()]
            if batch:
                if self.observer is not None:
                    now = time.perf_counter()
                    self.observer(entry.name, method, len(batch), [now - p.enqueued for p in batch])
                self._running[model] = self._running.get(model, 0) + 1
                try:
                    await self._run(call, batch, options)
                finally:
                    self._running[model] -= 1
                    if not self._running[model]:
                        del self._running[model]
        self._queues.pop(key, None)

    async def _gather(self, queue: _Queue) -> None:
        """Waits for company until the batch is full or its first item has waited max_wait."""
        deadline = queue.pending[0].enqueued + self.max_wait_s
        while len(queue.pending) < self.max_batch_size and time.perf_counter() < deadline:
            queue.wakeup.clear()
            try:
                await asyncio.wait_for(queue.wakeup.wait(), max(0.0, deadline - time.perf_counter()))
            except asyncio.TimeoutError:
                break

    async def _run(self, call, batch: list[_Pending], options: Hashable) -> None:
        started = time.perf_counter()
        try:
            results = await self.manager.run(call, [p.item for p in batch], options)
        except PipeserveError as exc:
            if len(batch) == 1:
                _settle(batch[0], exc=exc)
                return
            for pending in batch:  # isolate the caller whose input broke the batch
                await self._run(call, [pending], options)
            return
        except BaseException as exc:  # noqa: BLE001 - every waiter must be woken
            for pending in batch:
                _settle(pending, exc=exc)
            return
        compute_ms = (time.perf_counter() - started) * 1000.0
        for pending, value in zip(batch, results):
            _settle(pending, BatchResult(value, (started - pending.enqueued) * 1000.0, compute_ms, len(batch)))


def _settle(pending: _Pending, result: BatchResult | None = None, exc: BaseException | None = None) -> None:
    if pending.future.done():
        return
    if exc is not None:
        pending.future.set_exception(exc)
    else:
        pending.future.set_result(result)
