"""Speech recognition is admitted through a bounded queue like every other task (issue 12,
item 5): under overload, text tasks answered QUEUE_FULL at once while transcriptions queued
without bound (59 s waits, deadline expiries). Per model, asr_max_batch_rows calls run, max_queue
wait, and the next one is refused at once with RESOURCE_EXHAUSTED / QUEUE_FULL."""
from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest

from grpc_testing import error_reason, load_model, make_server

pytest.importorskip("transformers")
MAX_QUEUE = 2
RUNNING = 1


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import whisper_checkpoints as wc

    directory = wc.build(tmp_path_factory.mktemp("admission") / "whisper", multilingual=False)
    handle = make_server(max_queue=MAX_QUEUE, asr_max_batch_rows=RUNNING, hub_offline=True)
    info = load_model(handle, directory)
    yield handle, info.name
    handle.stop()


def _transcribe_request(model: str):
    from pipeserve.v1 import common_pb2, speech_recognition_pb2 as pb

    raw = common_pb2.RawAudio(samples=np.zeros(8000, "<f4").tobytes(), format=common_pb2.SAMPLE_FORMAT_FLOAT32_LE,
                              sample_rate=16000)
    return pb.TranscribeRequest(model=model, audio=common_pb2.AudioInput(raw=raw),
                                options=pb.TranscriptionOptions(max_new_tokens=4))


def _depth(handle, model: str) -> tuple[int, int]:
    async def read():
        return handle.running.app.admission.depth_by_model().get(model, (0, 0))
    return handle.call(read())


def _open_streams(handle, model: str, count: int):
    """`count` live streams that send their config and then hold the line open until released."""
    from pipeserve.v1 import common_pb2, speech_recognition_pb2 as pb, speech_recognition_pb2_grpc as pb_grpc

    release = threading.Event()
    results: list = [None] * count
    stub = pb_grpc.SpeechRecognitionServiceStub(handle.channel)

    def requests():
        yield pb.StreamingTranscribeRequest(config=pb.StreamingConfig(
            model=model, format=common_pb2.SAMPLE_FORMAT_FLOAT32_LE, sample_rate=16000, channels=1,
            options=pb.TranscriptionOptions(max_new_tokens=4)))
        release.wait(120)
        yield pb.StreamingTranscribeRequest(audio=pb.AudioChunk(samples=np.zeros(1600, "<f4").tobytes()))

    def run(i: int) -> None:
        try:
            results[i] = list(stub.StreamingTranscribe(requests(), timeout=180))
        except grpc.RpcError as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    return release, threads, results


def _wait_for_depth(handle, model: str, expected: tuple[int, int], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _depth(handle, model) != expected:
        assert time.monotonic() < deadline, f"admission depth {_depth(handle, model)}, expected {expected}"
        time.sleep(0.05)


def test_a_full_speech_queue_refuses_at_once_with_queue_full(server):
    """Live streams fill the model's running slot and its queue; every further call, unary,
    server-streaming or live, is refused at once, and the held ones then all finish."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    from pipeserve.v1 import speech_recognition_pb2_grpc as pb_grpc

    handle, model = server
    release, threads, results = _open_streams(handle, model, RUNNING + MAX_QUEUE)
    try:
        _wait_for_depth(handle, model, (RUNNING, MAX_QUEUE))
        stub = pb_grpc.SpeechRecognitionServiceStub(handle.channel)
        calls = [lambda: stub.Transcribe(_transcribe_request(model), timeout=30),
                 lambda: list(stub.TranscribeStream(_transcribe_request(model), timeout=30))]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert time.monotonic() - started < 10, "the refusal waited instead of answering at once"
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.value.details()
            assert error_reason(error.value) == "QUEUE_FULL"
            info = error_details_pb2.ErrorInfo()
            assert rpc_status.from_call(error.value).details[0].Unpack(info)
            assert int(info.metadata["retry_after_ms"]) > 0 and info.metadata["limit"] == str(MAX_QUEUE)
        extra_release, extra_threads, extra = _open_streams(handle, model, 1)
        extra_threads[0].join(30)
        extra_release.set()
        assert isinstance(extra[0], grpc.RpcError) and extra[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _depth(handle, model) == (RUNNING, MAX_QUEUE)
    finally:
        release.set()
        for t in threads:
            t.join(180)
    assert all(isinstance(r, list) and r[-1].HasField("done") for r in results), results
    _wait_for_depth(handle, model, (0, 0))


def test_many_concurrent_transcriptions_either_finish_or_are_refused_at_once(server):
    """16 callers at once against 1 running + 2 waiting: nothing but OK and QUEUE_FULL, every
    refusal fast, every accepted call done well within its deadline, and the gate empty after."""
    from pipeserve.v1 import speech_recognition_pb2_grpc as pb_grpc

    handle, model = server

    async def burst():
        async with grpc.aio.insecure_channel(handle.address) as channel:
            stub = pb_grpc.SpeechRecognitionServiceStub(channel)

            async def one():
                started = time.monotonic()
                try:
                    await stub.Transcribe(_transcribe_request(model), timeout=120)
                    return "OK", time.monotonic() - started
                except grpc.aio.AioRpcError as exc:
                    return f"{exc.code().name}/{error_reason(exc)}", time.monotonic() - started
            return await asyncio.gather(*(one() for _ in range(16)))

    outcomes = asyncio.run(burst())
    kinds = {kind for kind, _ in outcomes}
    assert kinds <= {"OK", "RESOURCE_EXHAUSTED/QUEUE_FULL"}, outcomes
    assert any(kind == "OK" for kind, _ in outcomes), outcomes
    refused = [s for kind, s in outcomes if kind != "OK"]
    assert all(s < 10 for s in refused), outcomes
    _wait_for_depth(handle, model, (0, 0))


# ---- the gate itself ------------------------------------------------------------------------------
def test_gate_runs_n_queues_m_and_refuses_the_next_in_arrival_order():
    from pipeserve.scheduling.admission import Admission
    from pipeserve.errors import QueueFull

    async def scenario():
        admission = Admission(running=1, max_waiting=2)
        order: list[str] = []
        first_in = asyncio.Event()
        release_first = asyncio.Event()

        async def call(name: str, hold: asyncio.Event | None = None):
            async with admission.slot("m"):
                order.append(name)
                if hold is not None:
                    first_in.set()
                    await hold.wait()

        first = asyncio.create_task(call("a", release_first))
        await first_in.wait()
        waiting = [asyncio.create_task(call(n)) for n in ("b", "c")]
        await asyncio.sleep(0)
        assert admission.depth_by_model() == {"m": (1, 2)}
        with pytest.raises(QueueFull) as error:
            async with admission.slot("m"):
                pass
        assert error.value.metadata["retry_after_ms"] and error.value.metadata["limit"] == "2"
        release_first.set()
        await asyncio.gather(first, *waiting)
        assert order == ["a", "b", "c"] and admission.depth_by_model() == {}

    asyncio.run(scenario())


def test_a_waiter_that_leaves_frees_its_place_and_never_loses_a_slot():
    from pipeserve.scheduling.admission import Admission

    async def scenario():
        admission = Admission(running=1, max_waiting=2)
        gate = admission.gate("m", 0)
        await gate.acquire()                              # the running call
        leaving = asyncio.create_task(gate.acquire())
        staying = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        leaving.cancel()                                  # leaves while waiting
        await asyncio.sleep(0)
        assert gate.waiting == 1 and gate.active == 1
        gate.release()                                    # the slot goes to the one still waiting
        await staying
        assert gate.active == 1 and gate.waiting == 0
        # A waiter cancelled in the same loop turn as its slot arrives passes the slot on.
        racing = asyncio.create_task(gate.acquire())
        after = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        gate.release()                                    # granted to `racing`...
        racing.cancel()                                   # ...which leaves before it runs
        await asyncio.gather(racing, return_exceptions=True)
        await asyncio.wait_for(after, 5)                  # so `after` gets it
        assert gate.active == 1 and gate.waiting == 0
        gate.release()
        assert gate.idle

    asyncio.run(scenario())
