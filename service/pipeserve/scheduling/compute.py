"""The compute lane: the server's model work runs on one thread (or a few, `lanes`), the only
ones whose torch ops start OpenMP teams.

Why: torch's OpenMP runtime (libgomp) gives every thread that runs a parallel operator its own
team of worker threads, and once the teams together hold more threads than there are cores
it stops letting idle workers spin: each of the ~40 parallel operators of a Whisper decoding
step then waits for sleeping workers to wake. Measured on our 2-core machine: a step takes
3.3 ms when one thread does all the work and 5.5 ms as soon as a second thread has run any
parallel operator (a whole transcription 3.7 s -> 5.5 s). A server runs model work from
several threads (executor workers, per-model batchers, generation engines), so it hit this
all the time.

How: one worker thread keeps torch's intra-op thread count; every other thread is set to one
thread (torch.set_num_threads(1) is also the default of threads started later), so stray
operators elsewhere never start a team. Work comes as short tasks (a batch's forward pass,
one generation-engine iteration, one item of a streaming generator), so callers interleave
at that granularity; on a CPU they would share the same cores anyway. Every task runs in
inference mode: generators suspended inside their own inference_mode blocks interleave on
this one thread, and the outer guard keeps each task's mode independent of that order.

Without `install()` (library use, most tests) `call` and `run` just run the work where they
are called, as before.

At exit the lanes finish their running task and stop before Python finalises (`stop_for_exit`,
called by exit_guard.py: a lane inside a torch operator then would abort the process).

Activity hooks (`set_activity_hooks`): the process is told when the lanes start working after
being idle and when they have been idle for IDLE_AFTER_S; the server keeps freed activations
in the C heap while busy and returns them when idle (runtime/manager.py, runtime/heap.py).
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Executor, Future
from typing import Any, Callable, TypeVar

import torch

from ..errors import Draining
from . import exit_guard

T = TypeVar("T")

_lane: "ComputeLane | None" = None
# torch's intra-op thread count when this module is first imported (OMP_NUM_THREADS, else the
# cores): later torch.set_num_threads calls are per thread, and the lane is usually installed
# from a thread that has not computed yet.
DEFAULT_THREADS = torch.get_num_threads()
_install_lock = threading.Lock()


# The lanes count as idle after this long without a task (a Whisper batch scheduler's slices
# follow each other within microseconds; a server between requests waits far longer).
IDLE_AFTER_S = 1.0


class _Activity:
    """Busy/idle transitions of all lanes together, reported to the hooks (module doc)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running = 0
        self.busy = False
        self.on_busy: Callable[[], Any] | None = None
        self.on_idle: Callable[[], Any] | None = None

    def started(self) -> None:
        with self.lock:
            self.running += 1
            hook = None if self.busy else self.on_busy
            self.busy = True
        if hook is not None:
            _call_hook(hook)

    def finished(self) -> None:
        with self.lock:
            self.running -= 1

    def quiet(self) -> None:
        """A lane waited IDLE_AFTER_S for a task."""
        with self.lock:
            hook = self.on_idle if self.busy and self.running == 0 else None
            if hook is not None:
                self.busy = False
        if hook is not None:
            _call_hook(hook)


def _call_hook(hook: Callable[[], Any]) -> None:
    try:
        hook()
    except Exception:  # a hook is housekeeping: it must never fail the lane
        pass


_activity = _Activity()


def set_activity_hooks(on_busy: Callable[[], Any] | None, on_idle: Callable[[], Any] | None) -> None:
    """`on_busy()` runs on a lane when it takes a task after the lanes were idle; `on_idle()`
    once they have all waited IDLE_AFTER_S without one (both from a lane thread; None: no hook)."""
    with _activity.lock:
        _activity.on_busy, _activity.on_idle = on_busy, on_idle


def _init_lane_thread(threads: int) -> None:
    torch.set_num_threads(threads)
    # torch reads its thread count into each thread's OpenMP settings at the thread's first
    # parallel operator; run one now, before the default becomes 1 for everyone else.
    torch.ones(1 << 17).add_(1)


class ComputeLane:
    """`lanes` compute threads with `threads` intra-op threads each (together the cores):
    one lane (the default) gives each operator every core, which suits models whose
    operators are large (memory- or compute-bound decoding); several single-thread lanes run
    that many calls at once, which suits small models whose time is Python and dispatch.

    Long tasks (a Whisper window decodes for a few hundred milliseconds) call `yield_point()`
    between steps: once a task has held its lane for `slice_s`, the tasks waiting for the
    lanes run there and then, nested on the same thread, so a short call arriving meanwhile
    waits milliseconds instead of the whole window."""

    slice_s = 0.02
    max_nesting = 4

    def __init__(self, threads: int | None = None, lanes: int = 1):
        total = threads or DEFAULT_THREADS
        self.lanes = max(1, lanes)
        self.threads = max(1, total // self.lanes)
        # None: the lane has stopped (stop_for_exit)
        self._queue: queue.SimpleQueue[tuple[Future, Callable, tuple, dict] | None] = queue.SimpleQueue()
        self._local = threading.local()
        self._idents: set[int] = set()
        self._stopped = False
        self._stop_lock = threading.Lock()  # a task is queued before the lane stops, or refused
        ready = threading.Barrier(self.lanes + 1)
        self.workers = [threading.Thread(target=self._worker, args=(ready,), name=f"pipeserve-compute_{i}", daemon=True)
                        for i in range(self.lanes)]
        for worker in self.workers:
            worker.start()
        # At exit the lanes stop after the threads that hand them work (exit_guard.py).
        exit_guard.register(self, last=True)
        # Every lane thread has set its thread count before the default drops to 1.
        ready.wait()
        torch.set_num_threads(1)  # this thread, and the default of every thread started from now

    def _worker(self, ready: threading.Barrier) -> None:
        _init_lane_thread(self.threads)
        self._idents.add(threading.get_ident())
        self._local.depth = 0
        ready.wait()
        while True:
            try:
                item = self._queue.get(timeout=IDLE_AFTER_S)
            except queue.Empty:
                _activity.quiet()
                continue
            if item is None:  # stopped
                return
            _activity.started()
            try:
                self._run(item)
            finally:
                # The finished task's function and arguments (a request's audio, a stream's
                # generator) must not stay alive while the lane waits for the next task.
                del item
                _activity.finished()

    def _run(self, item: tuple[Future, Callable, tuple, dict]) -> None:
        future, fn, args, kwargs = item
        if not future.set_running_or_notify_cancel():
            return
        local = self._local
        local.depth += 1
        local.slice_start = time.monotonic()
        try:
            with torch.inference_mode():
                result = fn(*args, **kwargs)
        except BaseException as exc:  # the caller gets it, the lane goes on
            future.set_exception(exc)
        else:
            future.set_result(result)
        finally:
            local.depth -= 1
            local.slice_start = time.monotonic()

    def _submit(self, fn: Callable[..., T], args: tuple, kwargs: dict) -> Future:
        future: Future = Future()
        with self._stop_lock:
            if self._stopped:
                raise Draining("the process is exiting: the compute lane takes no more work")
            self._queue.put((future, fn, args, kwargs))
        return future

    def stop_for_exit(self) -> list[threading.Thread]:
        """Refuses new tasks, cancels the queued ones and tells the lane threads to end once the
        running task ends (at its next yield point, if it has one): at exit (exit_guard.py);
        -> the lane threads."""
        with self._stop_lock:
            self._stopped = True
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
            for _ in self.workers:
                self._queue.put(None)
        return list(self.workers)

    def on_lane(self) -> bool:
        return threading.get_ident() in self._idents

    def yield_point(self) -> None:
        """Runs the tasks waiting for the lanes when the current task's slice is used up: those
        waiting now, not those arriving while they run. Under steady load the queue never
        empties, and draining it would keep the yielding task (and its caller) waiting for as
        long as the load lasts; arrivals wait for the next yield point or the lane's loop."""
        local = self._local
        if not self.on_lane():
            return
        if self._stopped:  # the process is exiting: the task ends here (module doc)
            raise Draining("the process is exiting: model work stopped")
        if time.monotonic() - local.slice_start < self.slice_s or local.depth >= self.max_nesting:
            return
        for _ in range(self._queue.qsize()):
            try:
                item = self._queue.get_nowait()
            except queue.Empty:  # another lane took it
                break
            if item is None:  # stopped: the lane's loop takes the sign again
                self._queue.put(None)
                break
            self._run(item)  # restarts this task's slice when it returns

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Runs `fn` on the lane and waits for it (inline when already there)."""
        if self.on_lane():
            return fn(*args, **kwargs)
        return self._submit(fn, args, kwargs).result()

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`call` for the event loop: awaits the lane without blocking the loop."""
        return await asyncio.wrap_future(self._submit(fn, args, kwargs))


def install(threads: int | None = None, lanes: int = 1) -> ComputeLane:
    """The process's lanes, created on first use (servers call this; later calls return the
    existing ones: OpenMP settings are per process)."""
    global _lane
    with _install_lock:
        if _lane is None:
            _lane = ComputeLane(threads, lanes)
        return _lane


def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Runs blocking model work on the lane when one is installed, else right here."""
    lane = _lane
    return fn(*args, **kwargs) if lane is None else lane.call(fn, *args, **kwargs)


def submit(fn: Callable[..., T], *args: Any) -> Future:
    """Queues model work on the lane without waiting for it (a batch scheduler keeps stepping
    while an encoder pass runs; its steps run at the pass's yield points). Without a lane, or
    from the lane itself, it runs here and the future is already done."""
    lane = _lane
    if lane is not None and not lane.on_lane():
        return lane._submit(fn, args, {})
    future: Future = Future()
    future.set_running_or_notify_cancel()
    try:
        future.set_result(fn(*args))
    except BaseException as exc:  # the caller reads it from the future
        future.set_exception(exc)
    return future


def installed() -> bool:
    """A compute lane runs this process's model work (servers install one)."""
    return _lane is not None


def on_lane() -> bool:
    """The calling thread is a compute lane (work waiting for other lane work would deadlock)."""
    lane = _lane
    return lane is not None and lane.on_lane()


async def run(fn: Callable[..., T], *args: Any, executor: Executor | None = None) -> T:
    """Awaits blocking model work: on the lane when one is installed, else on `executor`."""
    lane = _lane
    if lane is not None:
        return await lane.run(fn, *args)
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)


def yield_point() -> None:
    """Long model work calls this between steps (see ComputeLane); free off the lane."""
    lane = _lane
    if lane is not None:
        lane.yield_point()
