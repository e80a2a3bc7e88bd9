"""The model manager: resolves references, loads each model once (concurrent callers wait for
the one load), keeps models resident, counts in-flight use, and enforces a memory budget per
device by evicting idle least-recently-used models — never one in use.

Who decides what is loaded (DESIGN.md, security model): the configured preloads and LoadModel
(admin only when auth is on). A task call naming a model that is not resident loads it only
when the `on_demand_loading` setting allows that kind of name and the caller may change
models (pipeserve.caller); otherwise it gets NOT_FOUND / MODEL_NOT_LOADED, the same answer
whether or not such a path exists on the server, and nothing is touched.

One model is one entry: names are canonicalised (pipeserve.checkpoints.model_names), so any spelling of a
path finds the same entry. Failed loads stay listed (with their error) for a while so an admin
can see why, but at most FAILED_ENTRIES_MAX of them and for FAILED_ENTRY_TTL_S; a failure the
request caused (no such model, wrong task, over budget, not allowed) is never kept.

Defaults: a task's default is set by a preload, by LoadModel with set_default, or by the
first LoadModel of a task that has none, never by an on-demand load. The manager remembers how
a default was loaded, so an evicted default is reloaded by the next call that needs it (the
server's own choice, allowed whatever on_demand_loading says) and its task stays SERVING; a
default that failed to load is reported to the calls that name no model.

Longer than 450 lines: loading, residency, eviction and naming share one lock's state; the
memory-budget and eviction policy is the part to split out next.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, AsyncIterator, Callable, Collection

from .. import caller as callers
from ..checkpoints.hub import ModelFiles, resolve
from ..checkpoints.model_names import EMBEDDED_PREFIX, canonical_name, check_model_name, inside_root, is_local
from ..checkpoints.weights import dtype_name
from ..config import ModelSpec, Settings, chosen_quantization
from ..errors import (InvalidParameter, MemoryBudgetExceeded, ModelLoadFailed, ModelNotFound, PermissionDenied,
                     TaskNotImplemented, PipeserveError, WrongTask)
from ..pipelines.base import LoadOptions, Pipeline
from ..scheduling import compute
from ..tasks import Task
from .code_pages import release_code_pages
from .heap import limit_heap_slack, release_free_heap
from .loading import load_pipeline, model_type_of, task_of, with_source_defaults

log = logging.getLogger("pipeserve.manager")

# Values of Settings.on_demand_loading, from safest.
ON_DEMAND_MODES = ("off", "local", "any")
# Failed loads kept listed (with their error) for admins to read: bounded in number and age, so
# that no stream of bad loads grows ListModels, /metrics labels or the answers that list names.
FAILED_ENTRIES_MAX = 16
FAILED_ENTRY_TTL_S = 300.0
# LoadModel fields that pick how a model is loaded; a second load asking for other values is refused.
LOAD_CHOICES = ("device", "dtype", "load_in_8bit", "quantization", "revision", "defaults")


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
    memory: dict[str, int] = field(default_factory=dict)  # bytes by kind (layers/memory.py), summing to `bytes`
    loaded_at: float = 0.0
    last_used_at: float = 0.0
    failed_at: float = 0.0  # time.monotonic() of a failed load, for expiry
    evicted: bool = False  # dropped to make room (not unloaded): a caller waiting on it loads again
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def family(self) -> str:
        return self.pipeline.family if self.pipeline else ""

    @property
    def architecture(self) -> str:
        return self.pipeline.architecture if self.pipeline else ""


@dataclass(frozen=True)
class DefaultModel:
    """How a task's default was loaded, kept while it is evicted so it can be loaded again."""

    name: str  # canonical
    revision: str | None
    options: LoadOptions


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _placement(options: LoadOptions, revision: str | None) -> str:
    """How a model is loaded, in words: "float32 on cpu, int8 weights, revision main"."""
    form = _quantization(options)
    words = f"{options.dtype} on {options.device}" + (f", {form} weights" if form != "none" else "")
    if _storage_name(options) != dtype_name(options.dtype):
        words += f", {_storage_name(options)} weights"
    return words + (f", revision {revision}" if revision else "")


def _storage_name(options: LoadOptions) -> str:
    """The dtype the weights are stored in: weights_dtype where set, else the compute dtype."""
    return dtype_name(options.weights_dtype or options.dtype)


def _quantization(options: LoadOptions) -> str:
    """The quantized form `options` ask for or (once resolved) hold; "none" where the source
    decides and the load has not resolved it yet (loading.with_source_defaults)."""
    return chosen_quantization(options.quantization, options.load_in_8bit) or "none"


def _check_quantization(options: LoadOptions) -> None:
    """A request's quantization: a known form that its load_in_8bit does not contradict."""
    try:
        chosen_quantization(options.quantization, options.load_in_8bit)
    except ValueError as exc:
        raise InvalidParameter(str(exc), reason="INVALID_QUANTIZATION") from None


def _check_storage(options: LoadOptions) -> None:
    """A request's weights_dtype: float16 under a float32 model (layers/half_storage.py) or the
    compute dtype itself; not together with int8 (another storage). Whether the family can
    compute that way is the loader's check (it needs the checkpoint)."""
    storage, compute = _storage_name(options), dtype_name(options.dtype)
    if storage != compute and not (storage == "float16" and compute == "float32"):
        raise InvalidParameter(f"weights_dtype {storage} with dtype {compute}: weights can be stored in float16 "
                               "under a float32 model, or as the model's dtype", reason="INVALID_DTYPE")
    if storage != compute and _quantization(options) != "none":
        way = "load_in_8bit" if options.load_in_8bit else f"quantization {options.quantization}"
        raise InvalidParameter(f"weights_dtype float16 and {way} are two ways to store the weights; "
                               "choose one", reason="INVALID_DTYPE")


def _estimate_bytes(files: ModelFiles, options: LoadOptions) -> int:
    """Weight bytes once loaded, before loading: file sizes, scaled from the stored element size
    to the target. Only a first check (quantized GGUF blocks, for one, grow when dequantized):
    _fit_resident checks the bytes the loaded model really holds."""
    total = 0
    for pattern in ("*.safetensors", "model.bin", "pytorch_model*.bin", "*.gguf"):
        total += sum(p.stat().st_size for p in files.path.glob(pattern))
    stored = 2 if files.config.get("torch_dtype") in ("float16", "bfloat16") or files.has("model.bin") else 4
    target = 1 if _quantization(options) != "none" else 2 if _storage_name(options) == "float16" else options.torch_dtype.itemsize
    return total * target // stored


class ModelManager:
    def __init__(self, settings: Settings, *, loader: Callable[..., Pipeline] = load_pipeline,
                 on_change: Callable[[], None] = lambda: None, workers: int = 4):
        _check_settings(settings)
        self.settings = settings
        # Activations' pages go back as they are freed (runtime/heap.py): process-wide, set once
        # by the server's manager before any model loads.
        limit_heap_slack(settings.heap_mmap_threshold_bytes)
        # ...except while the compute lanes work (heap_mmap_threshold_busy_bytes): then freed
        # activations stay in the heap for the next pass (a fresh mapping per activation faults
        # its pages in again, 10-15 % of a transcription's CPU time), and once the lanes are
        # idle the threshold comes back and the free pages go (compute.set_activity_hooks).
        threshold, busy = settings.heap_mmap_threshold_bytes, settings.heap_mmap_threshold_busy_bytes
        if threshold > 0 and busy > threshold:
            compute.set_activity_hooks(lambda: limit_heap_slack(busy),
                                       lambda: (limit_heap_slack(threshold), release_free_heap()))
        else:
            compute.set_activity_hooks(None, None)
        self._loader = loader
        self._on_change = on_change
        self._models: dict[str, ModelEntry] = {}
        self._defaults: dict[Task, DefaultModel] = {}
        # task -> why its default failed to load (a preload, or LoadModel with set_default).
        self._default_failures: dict[Task, str] = {}
        self._lock = asyncio.Lock()
        # Blocking torch work (loads and forward passes) runs here, off the event loop.
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pipeserve-worker")

    # ---- queries -------------------------------------------------------------------------
    def entries(self, task: Task | None = None) -> list[ModelEntry]:
        self._expire_failed()
        return [e for e in self._models.values() if task is None or e.task is task]

    def default_name(self, task: Task) -> str | None:
        default = self._defaults.get(task)
        return default.name if default else None

    def is_default(self, entry: ModelEntry) -> bool:
        return entry.task is not None and self.default_name(entry.task) == entry.name

    def find(self, name: str) -> ModelEntry | None:
        """The entry `name` (any spelling of it) refers to, or None."""
        check_model_name(name)
        self._expire_failed()
        return self._models.get(canonical_name(name))

    def get(self, name: str) -> ModelEntry:
        entry = self.find(name)
        if entry is None:
            # Names are not listed here: ListModels does that, and a long list does not fit a trailer.
            raise ModelNotFound(f"model {name!r} is not loaded ({len(self._models)} models are; "
                                "ListModels lists them)")
        return entry

    def serving_tasks(self) -> set[Task]:
        """Tasks a call can be served for now: a READY model, or a default that was evicted
        and is loaded again on the next call."""
        ready = {e.task for e in self._models.values() if e.state is ModelState.READY and e.task}
        return ready | set(self._defaults)

    # ---- loading -------------------------------------------------------------------------
    def load_options(self, spec: ModelSpec | None = None, **overrides: Any) -> LoadOptions:
        """Settings, then the preload spec, then a request's overrides. Device, dtype and int8
        are choices; what relaxes safety (pickle) is a server ceiling a request may only lower."""
        if overrides.get("allow_pickle") and not self.settings.allow_pickle:
            raise PermissionDenied("this server does not load pickle checkpoints (its allow_pickle setting "
                                   "is off), and a request cannot turn that on", reason="PICKLE_NOT_ALLOWED")
        spec = spec or ModelSpec(model="")
        values = {
            "device": spec.device or self.settings.device,
            "dtype": spec.dtype or self.settings.dtype,
            "load_in_8bit": spec.load_in_8bit,
            "weights_dtype": spec.weights_dtype or "",
            "quantization": spec.quantization,
            "allow_pickle": self.settings.allow_pickle,
            "defaults": dict(spec.options),
            "max_image_pixels": self.settings.max_image_pixels,
            "max_audio_seconds": self.settings.max_audio_seconds,
            "max_prompt_tokens": self.settings.max_prompt_tokens,
            "max_queue": self.settings.max_queue,
            "generation_max_batch_size": self.settings.generation_max_batch_size,
            "generation_max_batch_tokens": self.settings.generation_max_batch_tokens,
            "asr_max_batch_rows": self.settings.asr_max_batch_rows,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        options = LoadOptions(**values)
        if overrides.get("quantization") is not None or overrides.get("load_in_8bit") is not None:
            _check_quantization(options)  # a request's; a config file's was checked at start
        if overrides.get("weights_dtype") is not None or overrides.get("quantization") is not None:
            _check_storage(options)
        return options

    async def load(self, name: str, *, revision: str | None = None, task: Task | str | None = None,
                   options: LoadOptions | None = None, set_default: bool | None = None,
                   chosen: Collection[str] = ("device", "dtype", "load_in_8bit"),
                   within_root: bool = False) -> ModelEntry:
        """Loads `name` once; concurrent callers wait for the same load.

        set_default: True makes it the task's default; None (LoadModel without set_default)
        only when the task has none; False never (on-demand loads). `chosen`: the load
        options the caller picked; asking for other values than a resident copy has is
        refused (FAILED_PRECONDITION) rather than answered with the other copy.
        within_root: local paths must lie inside the model_root setting (API requests)."""
        check_model_name(name)
        key = canonical_name(name)
        if not key:
            raise InvalidParameter("the model name is empty: give a local directory or a Hub id")
        wanted = Task.parse(task) if task else None
        options = options or self.load_options()
        try:
            if within_root:
                self._check_root(name, key)
            async with self._lock:
                entry = self._models.get(key)
                if entry is not None and entry.state is not ModelState.FAILED:
                    self._check_same_choices(name, entry, revision, options, chosen)
                else:
                    entry = ModelEntry(name=key, revision=revision, options=options)
                    self._models[key] = entry
                    asyncio.get_running_loop().create_task(self._load(entry, wanted))
            await entry.loaded.wait()
            if entry.state is ModelState.FAILED:
                if isinstance(entry.exception, _NOT_A_MODEL):
                    raise entry.exception
                raise ModelLoadFailed(f"model {name!r} failed to load: {entry.error}",
                                      reason=entry.error_reason or "MODEL_LOAD_FAILED")
            if wanted and entry.task is not wanted:
                raise WrongTask(f"model {name!r} serves {entry.task.value}, not {wanted.value}")
        except PipeserveError as exc:
            if set_default and wanted and wanted not in self._defaults:
                self._default_failures[wanted] = f"{name}: {exc.message}"
            raise
        if set_default or (set_default is None and entry.task not in self._defaults):
            self._defaults[entry.task] = DefaultModel(entry.name, entry.revision, entry.options)
            self._default_failures.pop(entry.task, None)
            self._on_change()
        return entry

    def _check_root(self, name: str, key: str) -> None:
        root = self.settings.model_root
        if root and is_local(key) and not inside_root(key, root):
            raise PermissionDenied(f"model {name!r} is outside the directory this server loads local models "
                                   "from (its model_root setting)", reason="MODEL_OUTSIDE_ROOT")

    @staticmethod
    def _check_same_choices(name: str, entry: ModelEntry, revision: str | None, options: LoadOptions,
                            chosen: Collection[str]) -> None:
        have, want = entry.options, options
        differs = [
            ("device" in chosen and want.device.strip().lower() != have.device.strip().lower()),
            ("dtype" in chosen and want.dtype != have.dtype),
            ("weights_dtype" in chosen and _storage_name(want) != _storage_name(have)),
            # resolved when the load starts (loading.with_source_defaults); before that None reads as float
            (("load_in_8bit" in chosen or "quantization" in chosen) and _quantization(want) != _quantization(have)),
            ("revision" in chosen and revision is not None and revision != (entry.revision or "main")),
            ("defaults" in chosen and want.defaults != have.defaults),
        ]
        if any(differs):
            wanted_words = _placement(want, revision)
            if "defaults" in chosen and want.defaults != have.defaults:
                wanted_words += f", default options {want.defaults}"
            raise ModelLoadFailed(
                f"model {name!r} is already {entry.state.value} as {_placement(have, entry.revision)}"
                f" (default options {have.defaults}); this request asks for {wanted_words}. Unload it first "
                "(ModelService.UnloadModel) to load it another way", reason="MODEL_LOADED_WITH_OTHER_OPTIONS")

    async def _load(self, entry: ModelEntry, task: Task | None) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            offline = True if self.settings.hub_offline else None
            files = await loop.run_in_executor(self.executor, lambda: resolve(
                entry.name, entry.revision, offline=offline, allow_pickle=entry.options.allow_pickle))
            entry.files = files
            entry.options = with_source_defaults(files, entry.options)  # quantized GGUF: grouped unless chosen
            entry.task = task or task_of(files)
            model_type_of(files)  # fail fast on unsupported formats before evicting anything
            await self._make_room(entry, _estimate_bytes(files, entry.options))
            if self.settings.release_code_pages:  # the imports' code leaves before the weights come (peak)
                release_code_pages()
            entry.pipeline = await loop.run_in_executor(self.executor, self._loader, files, entry.options, entry.task)
            entry.memory = entry.pipeline.memory_usage()  # by kind; their sum is what the budget counts
            entry.bytes = sum(entry.memory.values())
            self._fit_resident(entry)
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
            release_free_heap()  # the load's transient copies (runtime/heap.py)
            if self.settings.release_code_pages:  # import- and load-only code (runtime/code_pages.py), ~15 ms
                release_code_pages()
            entry.loaded.set()
            self._on_change()

    def _fail(self, entry: ModelEntry, exc: PipeserveError) -> None:
        entry.state = ModelState.FAILED
        entry.error, entry.error_reason, entry.exception = exc.message, exc.reason, exc
        if entry.pipeline is not None:
            entry.pipeline.close()
            entry.pipeline = None
        entry.failed_at = time.monotonic()
        if isinstance(exc, _NOT_A_MODEL):
            # Nothing was there to load (or the request was wrong): the caller gets the
            # specific status, and ListModels keeps showing real models only.
            if self._models.get(entry.name) is entry:
                del self._models[entry.name]
        self._expire_failed()

    def _expire_failed(self) -> None:
        """Drops failed entries older than FAILED_ENTRY_TTL_S, then all but the newest
        FAILED_ENTRIES_MAX (a dropped failure is simply loaded again next time)."""
        now = time.monotonic()
        failed = sorted((e for e in self._models.values() if e.state is ModelState.FAILED),
                        key=lambda e: e.failed_at)
        stale = [e for e in failed if now - e.failed_at > FAILED_ENTRY_TTL_S]
        kept = [e for e in failed if e not in stale]
        for entry in stale + kept[:max(0, len(kept) - FAILED_ENTRIES_MAX)]:
            if self._models.get(entry.name) is entry:
                del self._models[entry.name]

    async def _make_room(self, entry: ModelEntry, needed: int) -> None:
        """Before loading: evicts idle models on the same device, least recently used first,
        until the estimate `needed` fits the budget; refuses when models in use leave too
        little room. The estimate comes from file sizes; _fit_resident checks the real bytes."""
        budget = self.settings.memory_budget_bytes
        if budget <= 0:
            return
        device = str(entry.options.torch_device)
        if needed > budget:
            raise MemoryBudgetExceeded(f"{entry.name} needs about {_mib(needed)}, more than the "
                                       f"whole budget of {_mib(budget)} on {device}")
        self._evict_for(entry, needed, budget, device)

    def _fit_resident(self, entry: ModelEntry) -> None:
        """After loading: the model's resident bytes (not the file-size estimate) must fit the
        budget beside the other resident models; idle ones are evicted for it, else the new
        model is refused (and freed by _fail): nothing over budget stays."""
        budget = self.settings.memory_budget_bytes
        if budget <= 0:
            return
        device = str(entry.options.torch_device)
        if entry.bytes > budget:
            raise MemoryBudgetExceeded(f"{entry.name} holds {_mib(entry.bytes)} once loaded, more than the "
                                       f"whole budget of {_mib(budget)} on {device}")
        self._evict_for(entry, entry.bytes, budget, device)

    def _evict_for(self, entry: ModelEntry, needed: int, budget: int, device: str) -> None:
        resident = [e for e in self._models.values() if e is not entry and e.state is ModelState.READY
                    and str(e.options.torch_device) == device]
        used = sum(e.bytes for e in resident)
        idle = sorted((e for e in resident if e.in_flight == 0), key=lambda e: e.last_used_at)
        if used - sum(e.bytes for e in idle) + needed > budget:  # evicting would not be enough
            raise MemoryBudgetExceeded(
                f"{entry.name} needs about {_mib(needed)} but only {_mib(max(0, budget - used))} of the "
                f"{_mib(budget)} budget on {device} is free and the rest is in use")
        for victim in idle:
            if used + needed <= budget:
                break
            log.info("evicting %s (idle since %.0fs) to make room for %s", victim.name,
                     time.time() - victim.last_used_at, entry.name)
            used -= victim.bytes
            self._drop(victim)

    def _drop(self, entry: ModelEntry, *, forget_default: bool = False) -> None:
        """Frees a model. An evicted default stays the task's default (reloaded on next use);
        an unloaded one (forget_default) does not."""
        if self._models.get(entry.name) is entry:
            del self._models[entry.name]
        if entry.state in (ModelState.LOADING, ModelState.READY):
            entry.state = ModelState.UNLOADING  # a caller still holding it must not use it
        entry.evicted = not forget_default
        if forget_default and entry.task and self.default_name(entry.task) == entry.name:
            del self._defaults[entry.task]
        if entry.pipeline is not None:
            entry.pipeline.close()
            entry.pipeline = None
            release_free_heap()
        self._on_change()

    async def unload(self, name: str) -> ModelEntry:
        """Stops new calls at once, waits for in-flight ones, then frees the model; it stops
        being its task's default. An evicted default (not resident) is just forgotten."""
        check_model_name(name)
        key = canonical_name(name)
        if key not in self._models:
            for task, default in list(self._defaults.items()):
                if default.name == key:
                    del self._defaults[task]
                    self._on_change()
                    return ModelEntry(name=key, revision=default.revision, options=default.options, task=task,
                                      state=ModelState.UNLOADING)
        entry = self.get(name)
        await entry.loaded.wait()
        entry.state = ModelState.UNLOADING if entry.state is ModelState.READY else entry.state
        self._on_change()
        while entry.in_flight:
            entry.idle.clear()
            await entry.idle.wait()
        self._drop(entry, forget_default=True)
        return entry

    # ---- use -----------------------------------------------------------------------------
    async def acquire(self, name: str, task: Task) -> ModelEntry:
        """The READY model for a request: `name`, or the task's default when empty. A named
        model that is not resident is loaded on demand only where the settings and the
        caller allow it (see the module docstring)."""
        if name:
            check_model_name(name)
            key = canonical_name(name)
        else:
            default = self._defaults.get(task)
            if default is None:
                failure = self._default_failures.get(task)
                if failure:
                    raise ModelLoadFailed(f"the default model for {task.value} failed to load ({failure}); "
                                          "an admin can load another with LoadModel(set_default=true)",
                                          reason="DEFAULT_MODEL_FAILED")
                raise ModelNotFound(f"no model is loaded for {task.value} and the request names none; "
                                    "load one with ModelService.LoadModel", reason="NO_DEFAULT_MODEL")
            name = key = default.name
        for _attempt in range(3):
            entry = self._models.get(key)
            if entry is None or entry.state is ModelState.FAILED:
                entry = await self._load_for_call(name, key, task, entry)
            else:
                await entry.loaded.wait()
            if not entry.evicted:  # evicted by another load while this call waited: load it again
                break
        if entry.state is not ModelState.READY:
            raise ModelNotFound(f"model {name!r} is {entry.state.value}", reason="MODEL_NOT_READY")
        if entry.task is not task:
            raise WrongTask(f"model {name!r} serves {entry.task.value}, not {task.value}")
        return entry

    async def _load_for_call(self, name: str, key: str, task: Task, failed: ModelEntry | None) -> ModelEntry:
        """A task call needs `key`, which is not resident (or failed): reload a remembered
        default, or load on demand where allowed."""
        for default_task, default in self._defaults.items():
            if default.name == key:  # the server's own choice: reloaded whatever the caller
                return await self.load(key, revision=default.revision, task=default_task,
                                       options=default.options, set_default=False)
        if not self._may_load_on_demand(key):
            if failed is not None:  # listed in ListModels anyway, with this error
                raise ModelLoadFailed(f"model {name!r} failed to load: {failed.error}",
                                      reason=failed.error_reason or "MODEL_LOAD_FAILED")
            # The same answer whether or not `name` exists on this server: nothing about the
            # server's files may leak to a caller who could not load them.
            raise ModelNotFound(f"model {name!r} is not loaded, and this server does not load models named in "
                                "task calls for this caller; an admin must load it with ModelService.LoadModel",
                                reason="MODEL_NOT_LOADED")
        return await self.load(name, task=task, set_default=False, within_root=True)

    def _may_load_on_demand(self, key: str) -> bool:
        mode = self.settings.on_demand_loading
        if mode == "off" or not callers.current().may_change_models:
            return False
        if key.startswith(EMBEDDED_PREFIX):
            return True
        if is_local(key) and self.settings.model_root:
            return inside_root(key, self.settings.model_root)
        return mode == "any"

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
            self._drop(entry, forget_default=True)
        self.executor.shutdown(wait=False, cancel_futures=True)


# Failures the request caused: answered with their own status, never kept as FAILED entries.
_NOT_A_MODEL = (ModelNotFound, WrongTask, InvalidParameter, MemoryBudgetExceeded, TaskNotImplemented,
                PermissionDenied)


def _check_settings(settings: Settings) -> None:
    """The manager's settings, checked where they are used (config parsing checks them too)."""
    if settings.on_demand_loading not in ON_DEMAND_MODES:
        raise ValueError(f"on_demand_loading must be one of {', '.join(ON_DEMAND_MODES)}; "
                         f"got {settings.on_demand_loading!r}")
    if settings.model_root and not os.path.isdir(settings.model_root):
        raise ValueError(f"model_root {settings.model_root!r} is not a directory")
