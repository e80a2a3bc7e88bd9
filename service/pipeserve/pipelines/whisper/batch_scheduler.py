"""Cross-request batching for Whisper: one scheduler per model gathers the windows of every
transcription running at once (Transcribe, TranscribeStream, chunked mode and live streams all
decode through `generate`, whose model work goes to a `WindowRunner`), so that they share
encoder passes and decoding steps.

A call's thread keeps its own seek loop, fallback and segments (decoding.generate) and hands
the scheduler two kinds of work, waiting on a future for each:
- encode: log-mel windows; queued windows of all callers go through the encoder together,
  ENCODER_BATCH at a time, one pass in flight (its yield points let decoding steps through);
- decode: one window's rows with their logit filters, token decoder (greedy, sampling, beam
  search) and stop check. The window's prompt is prefilled (windows joining together share
  the projection of their first positions), then its rows JOIN the running batch; every step
  runs the rows of all active windows together (window_batch.py); a window LEAVES when its
  decoder is done or its caller stops, and its caller gets its results at once (a streamed segment is not held for the rest of the batch).

The batch adapts to load: it takes what is waiting, up to `max_rows` windows (a beam-search
window counts once); one call alone decodes exactly as with InlineRunner. A failing window
(a filter or decoder error) fails its caller only.

Threading: the scheduler's work runs as compute-lane tasks (one slice of steps each, ~20 ms),
driven by a scheduler thread that starts with the first window and ends when idle; callers
wait outside the lane, and their other model work (features, language detection, word
timing) is lane work too. A caller that is itself on the lane (work waiting on a lane task
from the lane would deadlock), or a process without a lane (library use), computes inline.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Callable

import torch

from ...errors import Draining
from ...scheduling import compute, exit_guard
from .decoding import ENCODER_BATCH, InlineRunner, WindowRunner
from .window_batch import ActiveWindow, WindowBatch

# A lane task of decoding steps returns after this long, so other lane work interleaves.
STEP_SLICE_S = 0.02
# The scheduler thread ends after this long without work (the next window starts another).
IDLE_S = 2.0


class _EncodeJob:
    def __init__(self, windows: torch.Tensor):
        self.windows = windows
        self.future: Future = Future()


class BatchScheduler:
    """The per-model scheduler (module doc). `session()` gives a call its runner."""

    def __init__(self, model, max_rows: int):
        self.model = model
        self.max_rows = max(1, int(max_rows))
        self._cond = threading.Condition()
        self._encodes: deque[_EncodeJob] = deque()
        self._encoding = False  # an encoder pass is in flight
        self._joining: deque[ActiveWindow] = deque()
        self._batch = WindowBatch(model.decoder)
        self._thread: threading.Thread | None = None
        self._closed = False
        exit_guard.register(self)  # its thread must not be inside the model when Python finalises

    def session(self) -> WindowRunner:
        """A runner for one transcription: batched when this scheduler can batch, else inline.
        Batching needs the compute lane (servers install it): without one, a call's torch work
        would run on two threads (its own and the scheduler's), and two OpenMP teams on the
        same cores slow every operator (scheduling/compute.py), so each call computes alone
        on its own thread, as a library call always did."""
        if self.max_rows <= 1 or self._closed or not compute.installed():
            return InlineRunner()
        return _Session(self)

    # -- callers -------------------------------------------------------------------------------

    def encode(self, windows: torch.Tensor) -> torch.Tensor:
        job = _EncodeJob(windows)
        with self._cond:
            self._check_open()
            self._encodes.append(job)
            self._wake()
        return job.future.result()

    def decode(self, window: ActiveWindow) -> list:
        with self._cond:
            self._check_open()
            self._joining.append(window)
            self._wake()
        return window.future.result()

    def close(self) -> None:
        """The model is going away: waiting and running windows fail with DRAINING, the thread ends."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def stop_for_exit(self) -> list[threading.Thread]:
        """close(), and the thread to wait for (exit_guard.py)."""
        self.close()
        thread = self._thread
        return [] if thread is None else [thread]

    def _check_open(self) -> None:
        if self._closed:
            raise Draining("the model was unloaded while this call was transcribing")

    def _wake(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="pipeserve-whisper-batch", daemon=True)
            self._thread.start()
        self._cond.notify_all()

    # -- the scheduler thread ------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            with torch.inference_mode():  # without a lane its tasks run on this thread
                while self._next_round():
                    pass
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            self._fail_all(exc)
            with self._cond:
                self._thread = None
            raise

    def _next_round(self) -> bool:
        """Starts an encoder pass when windows wait for one, then runs a slice of decoding
        steps; False when the thread should end (idle or closed)."""
        with self._cond:
            while not self._has_work():
                if self._closed or not self._cond.wait(IDLE_S):
                    if self._closed or not self._has_work():
                        self._thread = None
                        if self._closed:
                            self._fail_all(Draining("the model was unloaded while this call was transcribing"))
                        return False
            if self._closed:
                self._thread = None
                self._fail_all(Draining("the model was unloaded while this call was transcribing"))
                return False
            jobs = None
            if self._encodes and not self._encoding:
                jobs, self._encodes = list(self._encodes), deque()
                self._encoding = True
            decoding = bool(self._joining) or self._batch.active
        if jobs:
            compute.submit(self._encode, jobs).add_done_callback(self._encoded)
        if decoding:
            compute.call(self._advance)
        return True

    def _has_work(self) -> bool:
        return bool((self._encodes and not self._encoding) or self._joining or self._batch.active)

    def _encoded(self, _future: Future) -> None:
        with self._cond:
            self._encoding = False
            if self._encodes and not self._closed:
                self._wake()  # the thread may have ended while the pass ran
            self._cond.notify_all()

    def _encode(self, jobs: list[_EncodeJob]) -> None:
        """The queued windows of every caller, ENCODER_BATCH at a time (the encoder gives a
        window the same output in any batch); each caller gets its output as soon as its last
        window is through."""
        windows = torch.cat([job.windows for job in jobs])
        bounds, total = [], 0
        for job in jobs:
            bounds.append((total, total + job.windows.shape[0]))
            total += job.windows.shape[0]
        rows: list[torch.Tensor] = []
        done = 0
        try:
            for k in range(0, total, ENCODER_BATCH):
                rows.extend(self.model.encoder(windows[k:k + ENCODER_BATCH], after_layer=compute.yield_point).split(1))
                while done < len(jobs) and bounds[done][1] <= len(rows):
                    first, end = bounds[done]
                    jobs[done].future.set_result(torch.cat(rows[first:end]))
                    done += 1
        except BaseException as exc:  # the callers whose windows were not through get it
            for job in jobs[done:]:
                job.future.set_exception(exc)

    def _advance(self) -> None:
        """One lane task: windows waiting to join are prefilled and joined (within max_rows),
        then decoding steps run until the slice is used or no window is left."""
        started = time.monotonic()
        batch = self._batch
        while True:
            with self._cond:
                joining, rows = [], batch.rows
                while self._joining and (not (batch.active or joining) or rows + self._joining[0].rows <= self.max_rows):
                    joining.append(self._joining.popleft())
                    rows += joining[-1].rows
            if joining:
                batch.join(joining)
            if not batch.active:
                return
            batch.step()
            if time.monotonic() - started >= STEP_SLICE_S:
                return

    def _fail_all(self, exc: BaseException) -> None:
        for job in self._encodes:
            job.future.set_exception(exc)
        self._encodes.clear()
        for window in self._joining:
            window.fail(exc)
        self._joining.clear()
        self._batch.fail_all(exc)


class _Session(WindowRunner):
    """One transcription's runner on the model's scheduler."""

    def __init__(self, scheduler: BatchScheduler):
        self.scheduler = scheduler

    def encode(self, model, windows: torch.Tensor) -> torch.Tensor:
        if compute.on_lane():
            return InlineRunner().encode(model, windows)
        return self.scheduler.encode(windows)

    def decode(self, model, encoder_out, prompt, sot_index, s, filters, decoder, should_stop):
        if compute.on_lane():
            inline = InlineRunner()
            results = inline.decode(model, encoder_out, prompt, sot_index, s, filters, decoder, should_stop)
            self.batch_rows = max(self.batch_rows, inline.batch_rows)
            return results
        window = ActiveWindow(encoder_out, prompt, sot_index, s, filters, decoder, should_stop)
        results = self.scheduler.decode(window)
        self.batch_rows = max(self.batch_rows, window.peak_rows)
        return results

    def call(self, fn: Callable, *args, **kwargs):
        return compute.call(fn, *args, **kwargs)
