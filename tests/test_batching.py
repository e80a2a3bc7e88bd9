"""Dynamic batching: concurrent callers share batches bounded by size and wait, results go
back to the right caller, one caller's bad input fails only that caller, a full queue answers
QUEUE_FULL."""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import pytest

from pipeserve.runtime.batching import DynamicBatcher
from pipeserve.config import Settings
from pipeserve.errors import InvalidInput, QueueFull
from pipeserve.runtime.manager import ModelEntry, ModelManager
from pipeserve.pipelines.base import LoadOptions
from pipeserve.pipelines.options import TaskOptions


@dataclass(frozen=True)
class ScaleOptions(TaskOptions):
    scale: int = 1


DEFAULT = ScaleOptions()


class Doubler:
    def __init__(self):
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()

    def run_batch(self, items, options: ScaleOptions):
        self.gate.wait(5)
        self.batches.append(list(items))
        if any(i < 0 for i in items):
            raise InvalidInput(f"negative item in {items}")
        return [i * 2 * options.scale for i in items]


def _setup(**kwargs):
    manager = ModelManager(Settings(), workers=2)
    entry = ModelEntry(name="m", revision=None, options=LoadOptions())
    entry.pipeline = Doubler()
    return manager, entry, DynamicBatcher(manager, **kwargs)


async def test_concurrent_items_share_batches_and_results_stay_with_callers():
    manager, entry, batcher = _setup(max_batch_size=4, max_wait_ms=50)
    results = await asyncio.gather(*[batcher.submit(entry, i, DEFAULT) for i in range(10)])
    assert [r.value for r in results] == [i * 2 for i in range(10)]
    assert [len(b) for b in entry.pipeline.batches] == [4, 4, 2]
    assert max(r.batch_size for r in results) == 4


async def test_different_options_never_share_a_batch():
    manager, entry, batcher = _setup(max_batch_size=8, max_wait_ms=20)
    results = await asyncio.gather(batcher.submit(entry, 1, ScaleOptions(scale=1)),
                                   batcher.submit(entry, 1, ScaleOptions(scale=10)))
    assert [r.value for r in results] == [2, 20]
    assert len(entry.pipeline.batches) == 2


async def test_equal_options_built_apart_share_a_batch():
    # The grouping key is the options' value: each request builds its own frozen options.
    manager, entry, batcher = _setup(max_batch_size=8, max_wait_ms=300)
    entry.pipeline.gate.clear()  # the first batch holds the model, so the others gather
    first = asyncio.create_task(batcher.submit(entry, 0, ScaleOptions(scale=3)))
    await asyncio.sleep(0.05)
    later = [asyncio.create_task(batcher.submit(entry, i, ScaleOptions.of({"scale": 3}))) for i in (1, 2)]
    other = asyncio.create_task(batcher.submit(entry, 5, ScaleOptions(scale=1)))
    await asyncio.sleep(0.05)
    entry.pipeline.gate.set()
    results = await asyncio.wait_for(asyncio.gather(first, *later, other), timeout=5)
    assert [r.value for r in results] == [0, 6, 12, 10]
    assert sorted(entry.pipeline.batches) == [[0], [1, 2], [5]]


async def test_bad_item_fails_only_its_caller():
    manager, entry, batcher = _setup(max_batch_size=8, max_wait_ms=20)
    outcomes = await asyncio.gather(*[batcher.submit(entry, i, DEFAULT) for i in (1, -1, 3)],
                                    return_exceptions=True)
    assert outcomes[0].value == 2 and outcomes[2].value == 6
    assert isinstance(outcomes[1], InvalidInput)


async def test_full_queue_is_queue_full():
    manager, entry, batcher = _setup(max_batch_size=1, max_wait_ms=0, max_queue=2)
    entry.pipeline.gate.clear()  # the first batch blocks the worker
    first = asyncio.create_task(batcher.submit(entry, 0, DEFAULT))
    await asyncio.sleep(0.05)
    queued = [asyncio.create_task(batcher.submit(entry, i, DEFAULT)) for i in (1, 2)]
    await asyncio.sleep(0.01)
    with pytest.raises(QueueFull) as info:
        await batcher.submit(entry, 3, DEFAULT)
    assert info.value.metadata["retry_after_ms"] == "50"
    entry.pipeline.gate.set()
    assert [r.value for r in await asyncio.gather(first, *queued)] == [0, 2, 4]


async def test_lone_call_on_idle_model_runs_at_once():
    # A generous max wait: a lone call must not sit it out when nothing else is running.
    manager, entry, batcher = _setup(max_batch_size=8, max_wait_ms=2000)
    result = await asyncio.wait_for(batcher.submit(entry, 21, DEFAULT), timeout=1.5)
    assert result.value == 42 and result.batch_size == 1
    assert result.queue_ms < 500


async def test_calls_arriving_while_a_batch_runs_go_together_next():
    manager, entry, batcher = _setup(max_batch_size=8, max_wait_ms=2000)
    started = threading.Event()
    original = entry.pipeline.run_batch

    def run_batch(items, options):
        started.set()
        return original(items, options)

    entry.pipeline.run_batch = run_batch
    entry.pipeline.gate.clear()  # the first batch holds the model
    first = asyncio.create_task(batcher.submit(entry, 0, DEFAULT))
    while not started.is_set():
        await asyncio.sleep(0.005)
    later = [asyncio.create_task(batcher.submit(entry, i, DEFAULT)) for i in (1, 2, 3)]
    await asyncio.sleep(0.05)
    entry.pipeline.gate.set()
    results = await asyncio.wait_for(asyncio.gather(first, *later), timeout=1.5)
    assert [r.value for r in results] == [0, 2, 4, 6]
    assert entry.pipeline.batches == [[0], [1, 2, 3]]
    assert [r.batch_size for r in results] == [1, 3, 3, 3]


async def test_wait_when_idle_gathers_like_a_fixed_queue_delay():
    manager, entry, batcher = _setup(max_batch_size=8, max_wait_ms=300)
    batcher.wait_when_idle = True
    first = asyncio.create_task(batcher.submit(entry, 1, DEFAULT))
    await asyncio.sleep(0.05)
    second = asyncio.create_task(batcher.submit(entry, 2, DEFAULT))
    assert [r.value for r in await asyncio.gather(first, second)] == [2, 4]
    assert entry.pipeline.batches == [[1, 2]]
