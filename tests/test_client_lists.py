"""Calls on a list of inputs, as transformers' pipelines take one (`client.transcribe([a, b])`),
against the scripted server (tests/client_fakes.py), whose Transcribe counts the calls in
flight and is scripted by the audio bytes: the list comes back in input order, at most
max_concurrency calls are in flight, the first failure raises with the failed input's index
and cancels the other calls (on the server too), for both clients. Also to_dict() keeps
zero-valued fields."""
from __future__ import annotations

import asyncio
import time

import pytest

from client_fakes import FakeServer
from pipeserve_client import AsyncClient, Client, InputError, InvalidArgumentError, to_dict


@pytest.fixture
def fake():
    server = FakeServer()
    yield server
    server.stop()


def _request_ids(fake) -> list[str]:
    return [request.request_id for request in fake.requests]


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_list_returns_results_in_order_with_bounded_concurrency(fake, is_async):
    # Each call waits until three are in flight, so a bound of three is reached whatever the
    # machine's speed, and a fourth in flight would show as a peak of four.
    audio = [b"gate:3"] * 6

    def sync_call():
        with Client(fake.address, timeout=30, max_concurrency=3) as client:
            return client.transcribe(audio, request_id="r")

    async def async_call():
        async with AsyncClient(fake.address, timeout=30, max_concurrency=3) as client:
            return await client.transcribe(audio, request_id="r")

    results = asyncio.run(async_call()) if is_async else sync_call()
    assert fake.gate_timeouts == 0, "fewer than 3 calls were ever in flight together"
    assert len(results) == 6 and all(r.transcription.text == " part 0 part 1 part 2" for r in results)
    assert fake.peak_in_flight == 3
    assert len(fake.requests) == 6


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_results_keep_input_order(fake, is_async):
    # All four start together and the later inputs answer first.
    audio = [f"gate:4|sleep:{0.1 * (3 - i)}|text:{i}".encode() for i in range(4)]

    def sync_call():
        with Client(fake.address, timeout=30, max_concurrency=4) as client:
            return client.transcribe(audio, request_id="same"), client.transcribe(b"x"), client.transcribe([])

    async def async_call():
        async with AsyncClient(fake.address, timeout=30, max_concurrency=4) as client:
            return (await client.transcribe(audio, request_id="same"), await client.transcribe(b"x"),
                    await client.transcribe([]))

    results, one, empty = asyncio.run(async_call()) if is_async else sync_call()
    assert [r.transcription.text for r in results] == ["0", "1", "2", "3"]
    assert [r.request_id for r in results] == ["same"] * 4
    assert type(one) is type(results[0]) and empty == []


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_first_failure_raises_with_its_index_and_cancels_the_rest(fake, is_async):
    # The failure comes once all four calls are on the server.
    audio = [b"hold", b"hold", b"gate:4|fail", b"hold"]

    def sync_call():
        with Client(fake.address, timeout=30, max_concurrency=8) as client:
            client.transcribe(audio)

    async def async_call():
        async with AsyncClient(fake.address, timeout=30, max_concurrency=8) as client:
            await client.transcribe(audio)

    with pytest.raises(InvalidArgumentError) as info:
        asyncio.run(async_call()) if is_async else sync_call()
    assert info.value.index == 2 and info.value.reason == "INVALID_INPUT"
    assert str(info.value).startswith("input 2: cannot decode the audio")
    deadline = time.monotonic() + 5.0
    while fake.transcribe_cancelled < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    # A held call the client did not cancel ends after 10 s without counting as cancelled.
    assert fake.transcribe_cancelled == 3, "the server must see the other calls cancelled"
    assert fake.gate_timeouts == 0


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_inputs_not_started_when_a_failure_comes_never_start(fake, is_async):
    audio = [b"x", b"fail", b"x", b"x", b"x"]

    def sync_call():
        with Client(fake.address, timeout=30, max_concurrency=1) as client:
            client.transcribe(audio)

    async def async_call():
        async with AsyncClient(fake.address, timeout=30, max_concurrency=1) as client:
            await client.transcribe(audio)

    with pytest.raises(InvalidArgumentError) as info:
        asyncio.run(async_call()) if is_async else sync_call()
    assert info.value.index == 1
    assert len(fake.requests) == 2


def test_a_client_side_input_error_names_its_index(fake, tmp_path):
    with Client(fake.address, timeout=30) as client:
        with pytest.raises(InputError) as info:
            client.transcribe([b"x", tmp_path / "missing.wav"])
    assert info.value.index == 1 and "input 1: audio file not found" in str(info.value)


def test_stream_takes_one_input(fake):
    with Client(fake.address, timeout=30) as client:
        with pytest.raises(InputError, match=r"stream=True\) takes one input"):
            client.transcribe([b"x", b"y"], stream=True)
    assert fake.requests == []


def test_max_concurrency_is_validated():
    for bad in (0, -1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="max_concurrency"):
            Client("127.0.0.1:1", max_concurrency=bad)


def test_to_dict_keeps_zero_valued_fields(fake):
    with Client(fake.address, timeout=30) as client:
        response = client.transcribe(b"x")
    as_dict = to_dict(response)
    first = as_dict["transcription"]["segments"][0]
    assert first["start_s"] == 0.0 and first["end_s"] == 1.0  # the first segment starts at 0.0
    assert first["words"] == [] and first["avg_logprob"] == 0.0
    interim = to_dict(type(response.transcription.segments[0])(id="s1", start_s=1.0, is_final=False))
    assert interim["is_final"] is False and "end_s" not in interim  # optional and unset: still absent
