"""The model manager: resolves references, loads each model once (concurrent callers wait for
the one load), keeps models resident, counts in-flight use, and enforces a memory budget per
device by evicting idle least-recently-used models — never one in use.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, AsyncIterator, Callable

from . import compute
from .config import ModelSpec, Settings
from .errors import (InvalidParameter, MemoryBudgetExceeded, ModelLoadFailed, ModelNotFound, TaskNotImplemented,
                     PipeserveError, WrongTask)
from .hub import ModelFiles, resolve
from .loading import load_pipeline, model_type_of, task_of
from .pipelines.base import LoadOptions, Pipeline
from .tasks import Task

log = logging.getLogger("pipeserve.manager")


class ModelState(str, Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADING = "unloading"


@dataclass
class ModelEntry:
    name: str
    revision: str | None
    options: LoadOptions
    task: Task | None = None
    state: ModelState = ModelState.LOADING
    pipeline: Pipeline | None = None
    files: ModelFiles | None = None
    error: str = ""
    error_reason: str = ""
    # The typed error of a failed load, re-raised to every caller that waited for it.
    exception: PipeserveError | None = None
    in_flight: int = 0
    bytes: int = 0
    loaded_at: float = 0.0
    last_used_at: float = 0.0
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def family(self) -> str:
        return self.pipeline.family if self.pipeline else ""

    @property
    def architecture(self) -> str:
        return self.pipeline.architecture if self.pipeline else ""


def _estimate_bytes(files: ModelFiles, options: LoadOptions) -> int:
    """Weight bytes once loaded: file sizes, scaled from the stored element size to the target."""
    total = 0
    for pattern in ("*.safetensors", "model.bin", "pytorch_model*.bin"):
        total += sum(p.stat().st_size for p in files.path.glob(pattern))
    stored = 2 if files.config.get("torch_dtype") in ("float16", "bfloat16") or files.has("model.bin") else 4
    target = 1 if options.load_in_8bit else options.torch_dtype.itemsize
    return total * target // stored


class ModelManager:
    def __init__(self, settings: Settings, *, loader: Callable[..., Pipeline] = load_pipeline,
                 on_change: Callable[[], None] = lambda: None, workers: int = 4):
        self.settings = settings
        self._loader = loader
        self._on_change = on_change
        self._models: dict[str, ModelEntry] = {}
        self._defaults: dict[Task, str] = {}
        self._lock = asyncio.Lock()
        # Blocking torch work (loads and forward passes) runs here, off the event loop.
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pipeserve-worker")

    # ---- queries -------------------------------------------------------------------------
    def entries(self, task: Task | None = None) -> list[ModelEntry]:
        return [e for e in self._models.values() if task is None or e.task is task]

    def default_name(self, task: Task) -> str | None:
        return self._defaults.get(task)

    def is_default(self, entry: ModelEntry) -> bool:
        return entry.task is not None and self._defaults.get(entry.task) == entry.name

    def get(self, name: str) -> ModelEntry:
        entry = self._models.get(name)
        if entry is None:
            raise ModelNotFound(f"model {name!r} is not loaded; loaded: {sorted(self._models) or 'none'}")
        return entry

    def serving_tasks(self) -> set[Task]:
        return {e.task for e in self._models.values() if e.state is ModelState.READY and e.task}

    # ---- loading -------------------------------------------------------------------------
    def load_options(self, spec: ModelSpec | None = None, **overrides: Any) -> LoadOptions:
        spec = spec or ModelSpec(model="")
        values = {
            "device": spec.device or self.settings.device,
            "dtype": spec.dtype or self.settings.dtype,
            "load_in_8bit": spec.load_in_8bit,
            "allow_pickle": self.settings.allow_pickle,
            "defaults": dict(spec.options),
            "max_image_pixels": self.settings.max_image_pixels,
            "max_audio_seconds": self.settings.max_audio_seconds,
            "max_prompt_tokens": self.settings.max_prompt_tokens,
            "max_queue": self.settings.max_queue,
            "generation_max_batch_size": self.settings.generation_max_batch_size,
            "generation_max_batch_tokens": self.settings.generation_max_batch_tokens,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return LoadOptions(**values)

    async def load(self, name: str, *, revision: str | None = None, task: Task | str | None = None,
                   options: LoadOptions | None = None, set_default: bool = False) -> ModelEntry:
        """Loads `name` once; concurrent callers wait for the same load. A failed load stays
        listed as FAILED (with its error) until loaded again or unloaded."""
        wanted = Task.parse(task) if task else None
        async with self._lock:
            entry = self._models.get(name)
            if entry is None or entry.state is ModelState.FAILED:
                entry = ModelEntry(name=name, revision=revision, options=options or self.load_options())
                self._models[name] = entry
                asyncio.get_running_loop().create_task(self._load(entry, wanted))
        await entry.loaded.wait()
        if entry.state is ModelState.FAILED:
            if isinstance(entry.exception, _NOT_A_MODEL):
                raise entry.exception
            raise ModelLoadFailed(f"model {name!r} failed to load: {entry.error}",
                                  reason=entry.error_reason or "MODEL_LOAD_FAILED")
        if wanted and entry.task is not wanted:
            raise WrongTask(f"model {name!r} serves {entry.task.value}, not {wanted.value}")
        if set_default or (entry.task and entry.task not in self._defaults):
            self._defaults[entry.task] = name
            self._on_change()
        return entry

    async def _load(self, entry: ModelEntry, task: Task | None) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            offline = True if self.settings.hub_offline else None
            files = await loop.run_in_executor(self.executor, lambda: resolve(
                entry.name, entry.revision, offline=offline, allow_pickle=entry.options.allow_pickle))
            entry.files = files
            entry.task = task or task_of(files)
            model_type_of(files)  # fail fast on unsupported formats before evicting anything
            await self._make_room(entry, _estimate_bytes(files, entry.options))
            entry.pipeline = await loop.run_in_executor(self.executor, self._loader, files, entry.options, entry.task)
            entry.bytes = entry.pipeline.memory_bytes()
            entry.state = ModelState.READY
            entry.loaded_at = entry.last_used_at = time.time()
            log.info("loaded %s (%s, %s) in %.1fs, %d MiB", entry.name, entry.task.value,
                     entry.pipeline.family, time.perf_counter() - started, entry.bytes >> 20)
        except PipeserveError as exc:
            self._fail(entry, exc)
        except Exception as exc:  # a broken checkpoint must not take the server down
            log.exception("loading %s failed", entry.name)
            self._fail(entry, ModelLoadFailed(f"{type(exc).__name__}: {exc}"))
        finally:
            entry.loaded.set()
            self._on_change()

    def _fail(self, entry: ModelEntry, exc: PipeserveError) -> None:
        entry.state = ModelState.FAILED
        entry.error, entry.error_reason, entry.exception = exc.message, exc.reason, exc
        entry.pipeline = None
        if isinstance(exc, _NOT_A_MODEL):
            # Nothing was there to load (or the request was wrong): the caller gets the
            # specific status, and ListModels keeps showing real models only.
            self._models.pop(entry.name, None)

    async def _make_room(self, entry: ModelEntry, needed: int) -> None:
        """Evicts idle models on the same device, least recently used first, until `needed`
        fits the budget; refuses when models in use leave too little room."""
        budget = self.settings.memory_budget_bytes
        if budget <= 0:
            return
        device = str(entry.options.torch_device)
        if needed > budget:
            raise MemoryBudgetExceeded(f"{entry.name} needs about {needed >> 20} MiB, more than the "
                                       f"whole budget of {budget >> 20} MiB on {device}")
        resident = [e for e in self._models.values() if e is not entry and e.state is ModelState.READY
                    and str(e.options.torch_device) == device]
        used = sum(e.bytes for e in resident)
        for victim in sorted(resident, key=lambda e: e.last_used_at):
            if used + needed <= budget:
                break
            if victim.in_flight == 0:
                log.info("evicting %s (idle since %.0fs) to make room for %s", victim.name,
                         time.time() - victim.last_used_at, entry.name)
                used -= victim.bytes
                self._drop(victim)
        if used + needed > budget:
            raise MemoryBudgetExceeded(
                f"{entry.name} needs about {needed >> 20} MiB but only {(budget - used) >> 20} MiB of the "
                f"{budget >> 20} MiB budget on {device} is free and the rest is in use")

    def _drop(self, entry: ModelEntry) -> None:
        self._models.pop(entry.name, None)
        if entry.task and self._defaults.get(entry.task) == entry.name:
            del self._defaults[entry.task]
        if entry.pipeline is not None:
            entry.pipeline.close()
            entry.pipeline = None
        self._on_change()

    async def unload(self, name: str) -> ModelEntry:
        """Stops new calls at once, waits for in-flight ones, then frees the model."""
        entry = self.get(name)
        await entry.loaded.wait()
        entry.state = ModelState.UNLOADING if entry.state is ModelState.READY else entry.state
        self._on_change()
        while entry.in_flight:
            entry.idle.clear()
            await entry.idle.wait()
        self._drop(entry)
        return entry

    # ---- use -----------------------------------------------------------------------------
    async def acquire(self, name: str, task: Task) -> ModelEntry:
        """The READY model for a request: `name`, or the task's default when empty. A named
        model that is not resident is loaded on demand, as pipeline(model=...) does."""
        if not name:
            name = self._defaults.get(task, "")
            if not name:
                raise ModelNotFound(f"no model is loaded for {task.value} and the request names none; "
                                    "load one with ModelService.LoadModel", reason="NO_DEFAULT_MODEL")
        entry = self._models.get(name)
        if entry is None or entry.state is ModelState.FAILED:
            entry = await self.load(name, task=task)
        else:
            await entry.loaded.wait()
        if entry.state is not ModelState.READY:
            raise ModelNotFound(f"model {name!r} is {entry.state.value}", reason="MODEL_NOT_READY")
        if entry.task is not task:
            raise WrongTask(f"model {name!r} serves {entry.task.value}, not {task.value}")
        return entry

    @contextlib.asynccontextmanager
    async def use(self, name: str, task: Task) -> AsyncIterator[ModelEntry]:
        entry = await self.acquire(name, task)
        entry.in_flight += 1
        entry.last_used_at = time.time()
        try:
            yield entry
        finally:
            entry.in_flight -= 1
            entry.last_used_at = time.time()
            if entry.in_flight == 0:
                entry.idle.set()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Runs blocking model work on the compute lane, or the worker pool when there is none."""
        return await compute.run(fn, *args, executor=self.executor)

    async def close(self) -> None:
        for entry in list(self._models.values()):
            self._drop(entry)
        self.executor.shutdown(wait=False, cancel_futures=True)


_NOT_A_MODEL = (ModelNotFound, WrongTask, InvalidParameter, MemoryBudgetExceeded, TaskNotImplemented)
