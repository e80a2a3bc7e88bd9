"""The server's starting state. Until its servicers are bound (they import torch, after the
port is already answering) every service but health and reflection answers
UNAVAILABLE/STARTING; then, until the default model a task preloads at start has loaded (or
failed to), that task's service still answers UNAVAILABLE/STARTING, which clients retry,
instead of the NOT_FOUND/NO_DEFAULT_MODEL an empty model name would get, and health reports it
NOT_SERVING; the server as a whole ("") is NOT_SERVING until every preload has ended. ModelService, health and reflection stay open while the models load:
an operator can watch them load.

Also the two helpers of a quick start: reading the preloaded weights ahead while the process
imports, and the time since exec that the start-up log lines carry."""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Iterable, Mapping

from ..errors import Starting

log = logging.getLogger("pipeserve.startup")

# Files holding a checkpoint's tensors (CTranslate2, safetensors, GGUF).
WEIGHT_PATTERNS = ("model.bin", "*.safetensors", "*.gguf")


class Startup:
    def __init__(self, task_services: Mapping[str, str] | Iterable[str], starting: bool, *, bound: bool = True,
                 loading: Iterable[str] | None = None) -> None:
        """`task_services`: the services that serve a task, full name -> task name (a bare
        iterable of names: each counts as loading while `starting`). `starting`: default models
        are still loading. `bound`: the servicers are in place (False while the server imports
        them after binding its port). `loading`: the tasks whose default is still loading; a
        task's service opens when its own default has loaded (or failed to), so a quick model
        does not wait for a slow one."""
        self.task_services: dict[str, str | None] = (dict(task_services) if isinstance(task_services, Mapping)
                                                     else dict.fromkeys(task_services))
        self.starting = starting
        self.bound = bound
        self.loading: set[str] = set(loading or ())

    @property
    def open(self) -> bool:
        """Every service serves (the servicers are bound and the preload has ended)."""
        return self.bound and not self.starting

    def task_open(self, task: str | None) -> bool:
        """Calls of `task`'s service are served: the servicers are bound and its default (if
        it preloads one) is no longer loading."""
        if not self.bound:
            return False
        if task is None:  # a service named without its task: open with the whole start
            return not self.starting
        return task not in self.loading

    def check(self, method: str) -> None:
        """Refuses a call to a task service while its default loads, and to any service while
        the servicers are not bound yet (health and reflection are not checked here)."""
        if not self.bound:
            raise Starting("the server is starting (its services are still being loaded); retry shortly")
        service = method.lstrip("/").partition("/")[0]
        if self.starting and service in self.task_services and not self.task_open(self.task_services[service]):
            raise Starting("the server is starting and still loading its default model for this task; retry shortly")

    def loaded(self, task: str) -> None:
        """`task`'s default has loaded or failed to: its service opens."""
        self.loading.discard(task)

    def finish(self) -> None:
        self.starting = False
        self.loading.clear()


_IMPORTED_AT = time.monotonic()


def seconds_since_exec() -> float:
    """Seconds since this process was started (Linux: its start time in /proc, 10 ms ticks),
    else since this module was imported."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        with open("/proc/self/stat") as stat:
            started = int(stat.read().rsplit(")", 1)[1].split()[19]) / ticks  # field 22: starttime
        with open("/proc/uptime") as uptime:
            return max(0.0, float(uptime.read().split()[0]) - started)
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED_AT


def startup_timeline(stage: str) -> None:
    """Logs that `stage` of the start ended: seconds since exec, and the CPU seconds the
    process has used (all threads; on a loaded machine the wall time stretches, these less)."""
    log.info("startup_timeline: %s at %.2fs after exec (cpu %.2fs)", stage, seconds_since_exec(), time.process_time())


def _weight_files(model: str) -> list[Path]:
    """The weight files of a local or embedded (single-file) model, without loading anything
    heavy; [] for Hub ids and assembled embedded files (assembling is the load's job)."""
    from ..checkpoints import embedded
    from ..checkpoints.model_names import looks_like_path

    if model in embedded.NAMES:
        task = embedded.NAMES[model]
        folder = embedded.embedded_model_dir(task) if task not in embedded.ASSEMBLED else None
    elif looks_like_path(model):
        folder = Path(model).expanduser()
    else:
        folder = None
    if folder is None or not folder.is_dir():
        return []
    return [p for pattern in WEIGHT_PATTERNS for p in sorted(folder.glob(pattern)) if p.is_file()]


def prefetch_weights(models: Iterable[str]) -> threading.Thread | None:
    """Asks the kernel to read the weight files of `models` into the page cache (posix_fadvise
    WILLNEED, asynchronous readahead) from a daemon thread, so that a cold disk is read while
    the process imports torch instead of when the loader maps the file. Best effort: any
    failure only means the loader reads the file itself."""
    if not hasattr(os, "posix_fadvise"):
        return None
    names = list(models)
    if not names:
        return None

    def run() -> None:
        for name in names:
            try:
                files = _weight_files(name)
            except Exception as exc:  # a bad name is the load's to report, with its status
                log.debug("no prefetch for %r: %s", name, exc)
                continue
            for path in files:
                try:
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                    finally:
                        os.close(fd)
                except OSError as exc:
                    log.debug("no prefetch for %s: %s", path, exc)

    thread = threading.Thread(target=run, name="pipeserve-prefetch", daemon=True)
    thread.start()
    return thread
