"""Exit while model work runs (scheduling/exit_guard.py): the process exits 0 instead of aborting.

A daemon thread inside a torch operator when Python finalises aborts the process with SIGABRT
("terminate called without an active exception"); CI saw it after a test run that passed. Each
case runs a fresh interpreter that leaves work running when its main thread ends."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pipeserve.errors import Draining
from pipeserve.scheduling.compute import ComputeLane

ROOT = Path(__file__).resolve().parents[1]

# A torch loop of many short operators: between them the thread asks for the GIL back, which is
# where finalisation ends it.
BUSY = """
import time, torch
def busy(seconds, yields=False):
    from pipeserve.scheduling import compute
    a = torch.randn(128, 128)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        a = torch.tanh(a @ a)
        if yields:
            compute.yield_point()
"""


def _exit_while_busy(body: str, timeout: float = 60.0) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(ROOT / p) for p in ("service", "tests")))
    script = BUSY + textwrap.dedent(body) + "\nprint('main thread ends', flush=True)\n"
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - start


def _assert_clean_exit(done: subprocess.CompletedProcess) -> None:
    assert "main thread ends" in done.stdout, done.stderr
    assert "terminate called" not in done.stderr
    assert done.returncode == 0, f"exit code {done.returncode}: {done.stderr[-2000:]}"


def test_exit_waits_for_the_lanes_running_task():
    """Failed before the guard: exit code -6 (SIGABRT) every time."""
    done, _ = _exit_while_busy("""
        import threading
        from pipeserve.scheduling import compute
        started = threading.Event()
        compute.install(2)._submit(lambda: (started.set(), busy(1.5)), (), {})
        started.wait()
    """)
    _assert_clean_exit(done)


def test_a_task_that_yields_ends_at_its_next_yield_point():
    done, elapsed = _exit_while_busy("""
        import threading
        from pipeserve.scheduling import compute
        started = threading.Event()
        compute.install(2)._submit(lambda: (started.set(), busy(600, yields=True)), (), {})
        started.wait()
    """)
    _assert_clean_exit(done)
    assert elapsed < 30  # not the task's 600 s


def test_a_generation_engine_decoding_without_a_lane_stops_first(tmp_path):
    """No lane: the engine's own thread runs the model (library use, most tests)."""
    from generation_checkpoints import build

    build("gpt2", tmp_path)
    done, elapsed = _exit_while_busy(f"""
        from harness import load_pipeline
        from pipeserve.scheduling.generation_engine import TokenEvent
        pipe = load_pipeline({str(tmp_path)!r})
        engine = pipe.engine
        step = engine._iteration
        engine._iteration = lambda: (step(), busy(0.05))  # a slow model: each step 50 ms
        handle = engine.submit([1, 2, 3], pipe.parameters({{"max_new_tokens": 100, "ignore_eos": True}}))
        first = next(iter(handle))
        assert isinstance(first, TokenEvent)
    """)
    _assert_clean_exit(done)
    assert elapsed < 30


def test_a_task_past_the_grace_is_named_and_exit_does_not_wait_for_it():
    done, elapsed = _exit_while_busy("""
        import threading, time
        from pipeserve.scheduling import compute, exit_guard
        exit_guard.EXIT_GRACE_S = 0.5
        started = threading.Event()
        compute.install(2)._submit(lambda: (started.set(), time.sleep(600)), (), {})
        started.wait()
    """)
    _assert_clean_exit(done)
    assert "still running model work at exit" in done.stderr and "pipeserve-compute_0" in done.stderr
    assert elapsed < 30


def _on_own_thread(fn):
    """Runs `fn` on a fresh thread: a ComputeLane sets its creator's torch thread count to 1."""
    result = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as exc:  # re-raised on the test's thread
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_close_cancels_queued_tasks_refuses_new_ones_and_ends_the_lane_threads():
    def scenario():
        lane = ComputeLane(threads=1)
        started, release = threading.Event(), threading.Event()

        def work():
            started.set()
            return release.wait(10)

        running = lane._submit(work, (), {})
        assert started.wait(10)  # on the lane before close (a busy machine may take a while)
        queued = lane._submit(lambda: "never", (), {})
        threading.Timer(0.2, release.set).start()
        threads = lane.stop_for_exit()
        for thread in threads:
            thread.join(10)
        return lane, running, queued, threads

    lane, running, queued, threads = _on_own_thread(scenario)
    assert running.result(timeout=1) is True  # the running task ended normally
    assert queued.cancelled()
    assert threads == lane.workers and not any(t.is_alive() for t in threads)
    with pytest.raises(Draining, match="no more work"):
        lane._submit(lambda: None, (), {})
