"""The model manager without real models: single-flight loads, failed loads reported on the
model (bounded, expiring), LRU eviction under a memory budget (on resident bytes) that never
evicts a model in use, unload waiting for in-flight calls, who may load on demand, one entry
per model whatever its spelling, defaults that survive eviction, and bounded model names."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from pipeserve import caller as callers
from pipeserve.runtime import manager as manager_module
from pipeserve.config import Settings
from pipeserve.errors import (InvalidParameter, MemoryBudgetExceeded, ModelLoadFailed, ModelNotFound,
                              PermissionDenied, WrongTask)
from pipeserve.runtime.manager import ModelManager, ModelState
from pipeserve.pipelines.base import Pipeline
from pipeserve.tasks import Task


class FakePipeline(Pipeline):
    task = Task.TEXT_CLASSIFICATION

    def __init__(self, files, options, size):
        super().__init__(files, options, family="fake")
        self.size = size
        self.closed = False

    def memory_usage(self) -> dict[str, int]:
        """By kind, as Pipeline.memory_usage (layers/memory.py); the manager's budget sums them."""
        return {"weights": self.size, "packed": 0, "screening": 0, "cache": 0}

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


def _manager(budget=0, fail=(), delay=0.0, calls=None, resident_factor=1, closed=None, **settings):
    """A manager whose loader builds FakePipelines holding `resident_factor` x the file size."""
    def loader(files, options, task):
        if calls is not None:
            calls.append(files.name)
        time.sleep(delay)
        if task is not None and Task.parse(task) is not Task.TEXT_CLASSIFICATION:  # as loading.load_pipeline
            raise WrongTask(f"{files.name} is a text-classification model, not {task}")
        if any(f in files.name for f in fail):
            raise RuntimeError("corrupt weights")
        size = sum(p.stat().st_size for p in files.path.glob("*.safetensors")) * resident_factor
        pipeline = FakePipeline(files, options, size=size)
        if closed is not None:
            closed.append(pipeline)
        return pipeline

    return ModelManager(Settings(memory_budget_bytes=budget, **settings), loader=loader, workers=4)


# Callers as the security interceptor records them (pipeserve.caller).
AUTH_OFF = callers.Caller("peer:127.0.0.1", is_admin=False, auth_enabled=False)
USER = callers.Caller("token:user", is_admin=False, auth_enabled=True)
ADMIN = callers.Caller("token:admin", is_admin=True, auth_enabled=True)


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


# ---- who may load what ----------------------------------------------------------------------
async def test_task_calls_do_not_load_unless_settings_and_caller_allow(tmp_path):
    """on_demand_loading "off" (the default) refuses every unknown name, for any caller; with
    auth on, a user token is refused whatever the setting; the answer is the same for a
    directory that exists and one that does not, and nothing is loaded or listed."""
    calls: list[str] = []
    real, missing = _checkpoint(tmp_path, "a"), str(tmp_path / "missing")
    for mode, caller in [("off", AUTH_OFF), ("off", ADMIN), ("any", USER), ("local", USER)]:
        manager = _manager(calls=calls, on_demand_loading=mode, model_root=str(tmp_path))
        callers.set_current(caller)
        answers = []
        for name in (real, missing):
            with pytest.raises(ModelNotFound) as refused:
                await manager.acquire(name, Task.TEXT_CLASSIFICATION)
            assert refused.value.reason == "MODEL_NOT_LOADED" and "LoadModel" in refused.value.message
            answers.append(refused.value.message.replace(repr(name), "NAME"))
        assert answers[0] == answers[1], (mode, caller)  # does not reveal which path exists
        assert calls == [] and manager.entries() == []


async def test_on_demand_modes_and_model_root(tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    inside, outside = _checkpoint(root, "inside"), _checkpoint(tmp_path, "outside")
    escape = root / "escape"
    escape.symlink_to(outside)  # inside the root by name, outside by real path
    callers.set_current(AUTH_OFF)

    local = _manager(on_demand_loading="local", model_root=str(root))
    assert (await local.acquire(inside, Task.TEXT_CLASSIFICATION)).state is ModelState.READY
    for name in (outside, str(escape), "some-org/some-model"):  # outside the root; a Hub id
        with pytest.raises(ModelNotFound) as refused:
            await local.acquire(name, Task.TEXT_CLASSIFICATION)
        assert refused.value.reason == "MODEL_NOT_LOADED"
    assert [e.name for e in local.entries()] == [inside]

    anywhere = _manager(on_demand_loading="any")
    assert (await anywhere.acquire(outside, Task.TEXT_CLASSIFICATION)).name == outside
    callers.set_current(ADMIN)  # with auth on, an admin may load on demand as LoadModel does
    assert (await anywhere.acquire(str(escape), Task.TEXT_CLASSIFICATION)).name == outside

    # The root bounds LoadModel (within_root) too, symlinks included; preloads are exempt.
    rooted = _manager(model_root=str(root))
    for name in (outside, str(escape)):
        with pytest.raises(PermissionDenied) as denied:
            await rooted.load(name, within_root=True)
        assert denied.value.reason == "MODEL_OUTSIDE_ROOT"
    assert rooted.entries() == []
    assert (await rooted.load(inside, within_root=True)).state is ModelState.READY
    assert (await rooted.load(outside)).state is ModelState.READY


async def test_settings_are_checked_where_used(tmp_path):
    with pytest.raises(ValueError, match="on_demand_loading must be one of off, local, any"):
        _manager(on_demand_loading="yes")
    with pytest.raises(ValueError, match="model_root"):
        _manager(model_root=str(tmp_path / "nowhere"))


async def test_every_spelling_of_a_model_is_one_entry(tmp_path):
    calls: list[str] = []
    manager = _manager(calls=calls, on_demand_loading="any")
    callers.set_current(AUTH_OFF)
    name = _checkpoint(tmp_path, "a")
    (tmp_path / "link").symlink_to(name)
    (tmp_path / "sub").mkdir()
    spellings = [name, name + "/", name + "//", name + "/.", f" {name} ", str(tmp_path / "sub" / ".." / "a"),
                 str(tmp_path / "link"), str(tmp_path / "link") + "/", str(tmp_path).replace("/", "//") + "//a",
                 str(tmp_path / "." / "a")]
    spellings += [s + "/" * k for s in spellings[:4] for k in range(1, 6)]
    spellings += [name + "/." * k for k in range(1, 11)]
    assert len(spellings) >= 30
    entries = [await manager.acquire(s, Task.TEXT_CLASSIFICATION) for s in spellings]
    assert calls == [name] and all(e is entries[0] for e in entries)
    assert [e.name for e in manager.entries()] == [name]
    assert all(manager.get(s) is entries[0] for s in spellings)


async def test_failed_entries_are_bounded_and_expire(tmp_path, monkeypatch):
    manager = _manager(fail=("broken",), on_demand_loading="any")
    callers.set_current(AUTH_OFF)
    broken = [_checkpoint(tmp_path, f"broken{i}") for i in range(40)]
    for name in broken:
        with pytest.raises(ModelLoadFailed):
            await manager.load(name)
    failed = manager.entries()
    assert len(failed) == manager_module.FAILED_ENTRIES_MAX
    assert {e.name for e in failed} == set(broken[-manager_module.FAILED_ENTRIES_MAX:])  # the newest kept
    # Failures the request caused are never kept: not found, wrong task.
    for i in range(200):
        with pytest.raises(ModelNotFound):
            await manager.acquire(str(tmp_path / f"missing{i}"), Task.TEXT_CLASSIFICATION)
    good = _checkpoint(tmp_path, "good")
    with pytest.raises(WrongTask):
        await manager.acquire(good, Task.FILL_MASK)
    assert len(manager.entries()) == manager_module.FAILED_ENTRIES_MAX
    with pytest.raises(ModelNotFound, match="is not loaded"):
        manager.get(str(tmp_path / "missing7"))
    # And they expire.
    later = time.monotonic() + manager_module.FAILED_ENTRY_TTL_S + 1
    monkeypatch.setattr(manager_module.time, "monotonic", lambda: later)
    assert manager.entries() == []


async def test_on_demand_load_never_becomes_the_default(tmp_path):
    manager = _manager(on_demand_loading="any")
    callers.set_current(AUTH_OFF)
    on_demand, loaded = _checkpoint(tmp_path, "a"), _checkpoint(tmp_path, "b")
    await manager.acquire(on_demand, Task.TEXT_CLASSIFICATION)
    assert manager.default_name(Task.TEXT_CLASSIFICATION) is None
    with pytest.raises(ModelNotFound) as none:
        await manager.acquire("", Task.TEXT_CLASSIFICATION)
    assert none.value.reason == "NO_DEFAULT_MODEL"
    await manager.load(loaded)  # LoadModel without set_default: the first of its task still is
    assert manager.default_name(Task.TEXT_CLASSIFICATION) == loaded
    await manager.load(on_demand, set_default=True)
    assert manager.default_name(Task.TEXT_CLASSIFICATION) == on_demand


# ---- memory budget, options, defaults ------------------------------------------------------------
async def test_budget_counts_resident_bytes_not_file_sizes(tmp_path):
    """Files of 1,000 bytes that hold 3,000 once loaded: the estimate fits a 2,500-byte
    budget, the resident bytes do not, so the model is refused and freed; with room made by
    evicting an idle model, nothing over budget stays."""
    closed: list[FakePipeline] = []
    manager = _manager(budget=2500, resident_factor=3, closed=closed)
    big = _checkpoint(tmp_path, "big")
    with pytest.raises(MemoryBudgetExceeded, match="once loaded"):
        await manager.load(big)
    assert manager.entries() == [] and closed[-1].closed

    manager = _manager(budget=5000, resident_factor=2)
    a, b, c = (_checkpoint(tmp_path, n) for n in "abc")
    await manager.load(a)
    await manager.load(b)  # 2,000 + 2,000 resident
    await manager.load(c)  # the estimate (1,000) fit beside both; 6,000 resident would not
    assert {e.name for e in manager.entries()} == {b, c}
    assert sum(e.bytes for e in manager.entries()) <= 5000


async def test_loading_again_with_other_options_is_refused(tmp_path):
    manager = _manager()
    name = _checkpoint(tmp_path, "a")
    first = await manager.load(name)
    same = manager.load_options()
    assert await manager.load(name + "/", options=same) is first
    for change in [dict(dtype="bfloat16"), dict(device="auto"), dict(load_in_8bit=True)]:
        with pytest.raises(ModelLoadFailed) as refused:
            await manager.load(name, options=manager.load_options(**change))
        assert refused.value.reason == "MODEL_LOADED_WITH_OTHER_OPTIONS"
        assert "float32 on cpu" in refused.value.message and "Unload it first" in refused.value.message
    # Options the caller did not choose (LoadModel fields left unset) do not conflict.
    assert await manager.load(name, options=manager.load_options(dtype="bfloat16"), chosen=()) is first


async def test_evicted_default_stays_default_and_reloads(tmp_path):
    calls: list[str] = []
    manager = _manager(budget=1500, calls=calls)
    default, other = _checkpoint(tmp_path, "default"), _checkpoint(tmp_path, "other")
    await manager.load(default, task="text-classification", set_default=True)
    await manager.load(other)  # evicts the idle default
    assert [e.name for e in manager.entries()] == [other]
    assert manager.default_name(Task.TEXT_CLASSIFICATION) == default
    assert Task.TEXT_CLASSIFICATION in manager.serving_tasks()
    callers.set_current(USER)  # reloading the server's own default needs no permission
    entry = await manager.acquire("", Task.TEXT_CLASSIFICATION)
    assert entry.name == default and entry.state is ModelState.READY and calls == [default, other, default]
    assert [e.name for e in manager.entries()] == [default]
    # Unloaded (not evicted), it stops being the default.
    await manager.unload(default)
    assert manager.default_name(Task.TEXT_CLASSIFICATION) is None


async def test_failed_default_is_reported_to_calls_naming_no_model(tmp_path):
    manager = _manager(fail=("broken",))
    broken = _checkpoint(tmp_path, "broken")
    with pytest.raises(ModelLoadFailed):
        await manager.load(broken, task="text-classification", set_default=True)  # as a preload does
    with pytest.raises(ModelLoadFailed) as failed:
        await manager.acquire("", Task.TEXT_CLASSIFICATION)
    assert failed.value.reason == "DEFAULT_MODEL_FAILED" and "corrupt weights" in failed.value.message
    with pytest.raises(ModelNotFound):  # a missing preload directory too
        await manager.load(str(tmp_path / "gone"), task="fill-mask", set_default=True)
    with pytest.raises(ModelLoadFailed, match="default model for fill-mask failed"):
        await manager.acquire("", Task.FILL_MASK)
    await manager.load(_checkpoint(tmp_path, "good"))  # a working default replaces the failure
    assert (await manager.acquire("", Task.TEXT_CLASSIFICATION)).state is ModelState.READY


async def test_model_names_are_bounded_before_anything_else(tmp_path):
    calls: list[str] = []
    manager = _manager(calls=calls, on_demand_loading="any")
    callers.set_current(AUTH_OFF)
    for name, reason in [("x" * 4000, "MODEL_NAME_TOO_LONG"), ("/" + "a" * 100_000, "MODEL_NAME_TOO_LONG"),
                         (str(tmp_path) + "\0", "INVALID_MODEL_NAME"), ("a\r\nb", "INVALID_MODEL_NAME")]:
        for attempt in (lambda: manager.acquire(name, Task.TEXT_CLASSIFICATION), lambda: manager.load(name),
                        lambda: manager.unload(name)):
            with pytest.raises(InvalidParameter) as bad:
                await attempt()
            assert bad.value.reason == reason and len(bad.value.message) < 200
        with pytest.raises(InvalidParameter):
            manager.get(name)
    assert calls == [] and manager.entries() == []


async def test_allow_pickle_is_a_ceiling():
    strict, lenient = _manager(), _manager(allow_pickle=True)
    with pytest.raises(PermissionDenied) as denied:
        strict.load_options(allow_pickle=True)
    assert denied.value.reason == "PICKLE_NOT_ALLOWED"
    assert strict.load_options(allow_pickle=False).allow_pickle is False
    assert lenient.load_options(allow_pickle=False).allow_pickle is False  # a request may narrow
    assert lenient.load_options().allow_pickle is True


async def test_a_call_waiting_on_a_model_evicted_meanwhile_loads_it_again(tmp_path):
    """Another load may evict a model between its load finishing and a waiting call resuming
    (on_change runs in that gap, so the test evicts there): the calls load it again instead of
    getting an entry without a pipeline."""
    calls: list[str] = []
    manager = _manager(delay=0.1, calls=calls)
    name = _checkpoint(tmp_path, "a")
    first = await manager.load(name, task="text-classification", set_default=True)
    manager._drop(first)  # evicted: the default is loaded again by the next call
    evicted: list = []

    def evict_once() -> None:
        entry = manager._models.get(name)
        if entry is not None and entry.state is ModelState.READY and not evicted:
            evicted.append(entry)
            manager._drop(entry)  # as _evict_for does

    manager._on_change = evict_once
    calls_waiting = [asyncio.create_task(manager.acquire("", Task.TEXT_CLASSIFICATION)) for _ in range(2)]
    entries = await asyncio.gather(*calls_waiting)
    assert evicted and evicted[0].pipeline is None and evicted[0].state is ModelState.UNLOADING
    assert all(e.state is ModelState.READY and e.pipeline is not None and e is not evicted[0] for e in entries)
    assert calls == [name, name, name]
