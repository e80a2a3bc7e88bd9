"""The compute lane (compute.py): model work runs on one thread that alone keeps torch's
intra-op threads; other threads compute single-threaded, so they never start OpenMP teams."""
import asyncio
import os
import threading

import pytest
import torch

from pipeserve.scheduling import compute


@pytest.fixture(scope="module")
def lane():
    threads = max(2, torch.get_num_threads())
    return compute.install(threads)


def _task_count() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/task"))


def test_lane_keeps_the_intra_op_threads_and_other_threads_get_one(lane):
    assert compute.install() is lane  # one per process
    assert lane.call(torch.get_num_threads) == lane.threads >= 1  # installed earlier maybe, by a server
    assert lane.call(threading.get_ident) != threading.get_ident()
    seen = {}
    worker = threading.Thread(target=lambda: seen.update(n=torch.get_num_threads()))
    worker.start()
    worker.join()
    assert seen["n"] == 1
    assert compute.DEFAULT_THREADS >= 1


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_a_parallel_sized_operator_off_the_lane_starts_no_worker_threads(lane):
    big = torch.ones(1 << 22)
    counts = {}

    def work():
        counts["before"] = _task_count()
        (big * 2).sum()  # 4M elements: parallel in a multi-threaded thread
        counts["after"] = _task_count()

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert counts["after"] == counts["before"]


def test_call_runs_on_the_lane_in_inference_mode_and_propagates_errors(lane):
    assert lane.call(torch.is_inference_mode_enabled)
    assert lane.call(lambda: lane.call(threading.get_ident)) == lane.call(threading.get_ident)  # re-entrant

    def boom():
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        compute.call(boom)
    assert asyncio.run(compute.run(lambda a, b: a + b, 2, 3)) == 5


def test_generators_advanced_step_by_step_interleave_on_the_lane(lane):
    """iterate_in_thread advances each stream one item per lane task; two streams whose
    generators sit inside their own inference_mode blocks interleave without disturbing
    each other's results."""
    def stream(scale):
        with torch.inference_mode():
            cache = torch.zeros(3)
            for i in range(3):
                cache[i] = scale * (i + 1)  # in-place on an inference tensor: needs inference mode
                yield cache.sum().item()

    a, b = compute.call(stream, 1.0), compute.call(stream, 10.0)
    out_a, out_b = [], []
    for _ in range(3):
        out_a.append(compute.call(next, a))
        out_b.append(compute.call(next, b))
    assert out_a == [1.0, 3.0, 6.0] and out_b == [10.0, 30.0, 60.0]
    # Closed where they ran, as iterate_in_thread does: a generator closed on another thread
    # leaves that thread in the lane's inference mode (its `with` restores the lane's state).
    compute.call(a.close)
    compute.call(b.close)
    assert not torch.is_inference_mode_enabled()


def test_a_waiting_lane_keeps_no_reference_to_the_last_tasks_arguments(lane):
    import gc
    import weakref

    class Payload:
        pass

    payload = Payload()
    alive = weakref.ref(payload)
    assert compute.call(lambda p: p is not None, payload)
    del payload
    gc.collect()
    assert alive() is None, "the lane still holds the finished task's arguments"


def test_grpc_stream_runs_on_the_lane(lane):
    """iterate_in_thread (every streaming RPC) runs its generator's steps on the lane."""
    from pipeserve.api.common import iterate_in_thread

    def stream():
        for _ in range(3):
            yield threading.get_ident()

    async def collect():
        return [x async for x in iterate_in_thread(stream, None)]

    idents = asyncio.run(collect())
    assert set(idents) == {lane.call(threading.get_ident)}


def test_several_lanes_split_the_threads_and_run_calls_at_once(lane):
    lanes = compute.ComputeLane(threads=2, lanes=2)  # not installed: a second pool, for this test
    both = threading.Barrier(2, timeout=10)

    def meet():
        both.wait()  # returns only when the other lane is inside a task at the same time
        return threading.get_ident(), torch.get_num_threads()

    async def together():
        return await asyncio.gather(lanes.run(meet), lanes.run(meet))

    (a, threads_a), (b, threads_b) = asyncio.run(together())
    assert a != b and threads_a == threads_b == 1
    assert lanes.call(lambda: lanes.on_lane()) and not lanes.on_lane()


def test_a_long_task_lets_waiting_calls_through_at_its_yield_points(lane):
    import time

    order = []
    started = threading.Event()

    def long_task():
        started.set()
        end = time.monotonic() + 0.6
        while time.monotonic() < end:
            torch.ones(64).add_(1)  # a "decoding step"
            compute.yield_point()
        order.append("long")
        return torch.is_inference_mode_enabled()

    def short_task():
        order.append("short")
        return threading.get_ident(), torch.is_inference_mode_enabled()

    results = {}
    long_thread = threading.Thread(target=lambda: results.update(long=lane.call(long_task)))
    long_thread.start()
    started.wait(5)
    time.sleep(0.05)
    t0 = time.monotonic()
    ident, mode = lane.call(short_task)
    waited = time.monotonic() - t0
    long_thread.join(5)
    assert order == ["short", "long"]  # ran inside the long task, not after it
    assert waited < 0.3, waited
    assert mode and results["long"]  # both in inference mode
    assert lane.on_lane() is False and ident in lane._idents


def test_yield_point_off_the_lane_and_errors_inside_nested_tasks(lane):
    compute.yield_point()  # not on a lane: nothing happens

    def failing():
        raise ValueError("nested failure")

    def long_task():
        import time

        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            compute.yield_point()
        return "done"

    results = {}
    worker = threading.Thread(target=lambda: results.update(long=lane.call(long_task)))
    worker.start()
    import time

    time.sleep(0.05)
    with pytest.raises(ValueError, match="nested failure"):
        lane.call(failing)
    worker.join(5)
    assert results["long"] == "done"  # the nested error stayed with its caller


def test_a_yield_point_runs_only_the_calls_already_waiting_so_a_long_task_is_not_starved(lane):
    """Under steady load the queue never empties: a yield point that drained it until empty kept
    the task that yielded waiting for as long as the load lasted (the ASR concurrency bench saw
    the first of 4 callers answered after the whole 123 s run). A yield point runs the calls
    waiting when it is reached, and new arrivals wait for the next one."""
    import time

    ran = []
    at_finish = {}
    started = threading.Event()

    def chain():  # a caller that sends its next call as soon as the last one is answered
        ran.append(1)
        if len(ran) < 200:
            lane._submit(chain, (), {})

    def long_task():
        started.set()
        for _ in range(3):
            time.sleep(lane.slice_s * 1.5)  # the slice is used up: the yield point lets calls in
            compute.yield_point()
        at_finish["ran"] = len(ran)

    worker = threading.Thread(target=lambda: lane.call(long_task))
    worker.start()
    assert started.wait(5)
    lane._submit(chain, (), {})
    worker.join(10)
    assert not worker.is_alive()
    assert at_finish["ran"] <= 3, at_finish  # one waiting call per yield point, not the whole stream
    deadline = time.monotonic() + 10
    while len(ran) < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(ran) == 200  # the stream still runs to its end, after the long task


def test_activity_hooks_run_when_the_lanes_start_working_and_after_they_idle(lane, monkeypatch):
    """The server keeps freed activations in the heap while the lanes work and returns them once
    idle (runtime/manager.py): on_busy runs once when work starts after idleness, on_idle once
    the lanes have waited IDLE_AFTER_S without a task, never while a task runs."""
    import time

    monkeypatch.setattr(compute, "IDLE_AFTER_S", 0.05)
    lanes = compute.ComputeLane(threads=1, lanes=2)  # a fresh pool reads the short idle time
    events = []
    compute.set_activity_hooks(lambda: events.append("busy"), lambda: events.append("idle"))
    try:
        time.sleep(0.3)  # earlier tests' work ends in an idle report: start from quiet lanes
        events.clear()

        def long_task():
            time.sleep(0.3)  # the other lane waits IDLE_AFTER_S several times meanwhile
            return list(events)

        assert lanes.call(long_task) == ["busy"]  # no idle hook while a task runs
        deadline = time.monotonic() + 5
        while events == ["busy"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert events == ["busy", "idle"]
        lanes.call(lambda: None)
        # The idle report for this short task may already have come (IDLE_AFTER_S is 50 ms and a
        # busy machine can hold this thread longer than that): at most one, after the busy one.
        assert events[:3] == ["busy", "idle", "busy"]
        assert events[3:] in ([], ["idle"])
    finally:
        compute.set_activity_hooks(None, None)
