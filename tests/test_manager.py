"""The model manager without real models: single-flight loads, failed loads reported on the
model, LRU eviction under a memory budget that never evicts a model in use, unload waiting
for in-flight calls."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from pipeserve.config import Settings
from pipeserve.errors import MemoryBudgetExceeded, ModelLoadFailed, ModelNotFound, WrongTask
from pipeserve.manager import ModelManager, ModelState
from pipeserve.pipelines.base import Pipeline
from pipeserve.tasks import Task


class FakePipeline(Pipeline):
    task = Task.TEXT_CLASSIFICATION

    def __init__(self, files, options, size):
        super().__init__(files, options, family="fake")
        self.size = size
        self.closed = False

    def memory_bytes(self) -> int:
        return self.size

    def close(self) -> None:
        self.closed = True


def _checkpoint(root, name, size=1000):
    path = root / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForSequenceClassification"]}))
    (path / "model.safetensors").write_bytes(b"\0" * size)
    return str(path)


def _manager(budget=0, fail=(), delay=0.0, calls=None):
    def loader(files, options, task):
        if calls is not None:
            calls.append(files.name)
        time.sleep(delay)
        if any(f in files.name for f in fail):
            raise RuntimeError("corrupt weights")
        return FakePipeline(files, options, size=sum(p.stat().st_size for p in files.path.glob("*.safetensors")))

    return ModelManager(Settings(memory_budget_bytes=budget), loader=loader, workers=4)


async def test_concurrent_callers_share_one_load(tmp_path):
    calls: list[str] = []
    manager = _manager(delay=0.2, calls=calls)
    name = _checkpoint(tmp_path, "a")
    entries = await asyncio.gather(*[manager.load(name) for _ in range(5)])
    assert calls == [name]
    assert all(e is entries[0] for e in entries)
    assert entries[0].state is ModelState.READY and entries[0].bytes == 1000


async def test_failed_load_is_reported_and_others_keep_working(tmp_path):
    manager = _manager(fail=("broken",))
    broken, good = _checkpoint(tmp_path, "broken"), _checkpoint(tmp_path, "good")
    with pytest.raises(ModelLoadFailed, match="corrupt weights"):
        await manager.load(broken)
    assert manager.get(broken).state is ModelState.FAILED
    assert "corrupt weights" in manager.get(broken).error
    assert (await manager.load(good)).state is ModelState.READY
    with pytest.raises(ModelNotFound):
        await manager.load(str(tmp_path / "missing"))
    assert str(tmp_path / "missing") not in [e.name for e in manager.entries()]


async def test_budget_evicts_idle_lru_never_in_use(tmp_path):
    manager = _manager(budget=2500)
    a, b, c, d = (_checkpoint(tmp_path, n) for n in "abcd")
    await manager.load(a)
    await manager.load(b)
    async with manager.use(a, Task.TEXT_CLASSIFICATION):  # a is now most recent and in use
        await manager.load(c)  # needs room: b (idle, LRU) goes, a stays
        assert {e.name for e in manager.entries()} == {a, c}
        async with manager.use(c, Task.TEXT_CLASSIFICATION):
            with pytest.raises(MemoryBudgetExceeded):
                await manager.load(d)  # both residents are in use
    big = _checkpoint(tmp_path, "big", size=5000)
    with pytest.raises(MemoryBudgetExceeded, match="whole budget"):
        await manager.load(big)


async def test_unload_waits_for_in_flight_and_refuses_new_calls(tmp_path):
    manager = _manager()
    name = _checkpoint(tmp_path, "a")
    entry = await manager.load(name)
    released = asyncio.Event()

    async def in_flight():
        async with manager.use(name, Task.TEXT_CLASSIFICATION):
            await released.wait()

    user = asyncio.create_task(in_flight())
    await asyncio.sleep(0.01)
    unloading = asyncio.create_task(manager.unload(name))
    await asyncio.sleep(0.05)
    assert not unloading.done() and entry.state is ModelState.UNLOADING
    with pytest.raises(ModelNotFound):
        await manager.acquire(name, Task.TEXT_CLASSIFICATION)
    released.set()
    await asyncio.gather(user, unloading)
    assert entry.pipeline is None and manager.entries() == []


async def test_wrong_task_and_defaults(tmp_path):
    manager = _manager()
    name = _checkpoint(tmp_path, "a")
    await manager.load(name)
    assert manager.default_name(Task.TEXT_CLASSIFICATION) == name
    assert (await manager.acquire("", Task.TEXT_CLASSIFICATION)).name == name
    with pytest.raises(WrongTask):
        await manager.acquire(name, Task.FILL_MASK)
    with pytest.raises(ModelNotFound, match="no model is loaded"):
        await manager.acquire("", Task.FILL_MASK)
