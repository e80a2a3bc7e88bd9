"""Client and AsyncClient get their methods from one description (pipeserve_client/_methods.py):
the generated modules are up to date, every RPC in the protos is reachable from both clients
with the same signature, both build the same request for the same call, and both follow the
same retry and deadline policy (only the sleep differs). No server: calls are recorded, or
answered by scripted stand-ins for the stubs."""
from __future__ import annotations

import asyncio
import importlib
import inspect
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.message_factory import GetMessageClass

from pipeserve_client import AsyncClient, Client, RetryPolicy
from pipeserve_client import _codegen, _methods
from pipeserve_client._methods import Kind
from pipeserve_client._services import service_descriptor, service_names

PROTOS = Path(__file__).resolve().parents[1] / "protos" / "pipeserve" / "v1"

# One call per method; a method added to the description needs a line here.
SAMPLES = {
    "list": ((), {"task": "image-classification"}),
    "get": (("m",), {}),
    "load": (("org/model",), {"task": "fill-mask", "dtype": "float16", "default_options": {"top_k": 2}}),
    "unload": (("m",), {}),
    "transcribe": ((b"RIFF....WAVE",), {"model": "w", "return_timestamps": "word", "temperature": (0.0, 0.4)}),
    "transcribe_live": (([np.zeros(160, np.float32), np.ones(80, np.int16)],),
                        {"sampling_rate": 16000, "language": "en", "interim_interval_s": 0.5}),
    "generate": (("Once upon",), {"max_new_tokens": 4, "stop": "\n", "seed": 3}),
    "classify_image": ((b"\x89PNG....",), {"top_k": 2, "function_to_apply": "softmax"}),
    "document_qa": ((b"\x89PNG....", "Total?"), {"word_boxes": [("Total", (0, 0, 10, 10))], "lang": "eng"}),
    "zero_shot": (("The match ended 2-1", "sports, politics"), {"multi_label": True}),
    "classify_text": (("I love it",), {"text_pair": "me too", "top_k": 2}),
    "classify_tokens": (("My name is Wolfgang",), {"aggregation_strategy": "simple", "ignore_labels": ["O"]}),
    "answer_question": (("Where?", "I live in Berlin"), {"top_k": 2, "align_to_words": False}),
    "fill_mask": (("Paris is the [MASK] of France.",), {"targets": "capital"}),
    "extract_features": (("The quick brown fox",), {"pooling": "mean", "normalize": True}),
}


def _proto_rpcs() -> set[tuple[str, str]]:
    """(service full name, rpc) of every RPC in protos/pipeserve/v1."""
    rpcs = set()
    for proto in sorted(PROTOS.glob("*.proto")):
        module = importlib.import_module(f"pipeserve.v1.{proto.stem}_pb2")
        for service in module.DESCRIPTOR.services_by_name.values():
            rpcs |= {(service.full_name, method.name) for method in service.methods}
    return rpcs


def _owners(spec) -> tuple[type, type]:
    from pipeserve_client.aio import AsyncModels
    from pipeserve_client.client import Models

    return (Models, AsyncModels) if spec.group == "models" else (Client, AsyncClient)


def test_generated_method_modules_are_up_to_date():
    for flavour in _codegen.FLAVOURS:
        path = Path(_codegen.__file__).parent / flavour.filename
        assert path.read_text() == _codegen.render(flavour), \
            f"{flavour.filename} is stale: run python -m pipeserve_client._codegen"


def test_every_rpc_is_reachable_from_both_clients_with_the_same_signature():
    described = {(service_descriptor(spec.service).full_name, rpc) for spec in _methods.METHODS for rpc in spec.rpcs}
    assert described == _proto_rpcs()
    assert {service_descriptor(name).full_name for name in service_names()} == {s for s, _ in _proto_rpcs()}
    assert set(SAMPLES) == {spec.method_name for spec in _methods.METHODS}
    for spec in _methods.METHODS:
        sync_owner, async_owner = _owners(spec)
        sync, aio = getattr(sync_owner, spec.method_name), getattr(async_owner, spec.method_name)
        expected = ["self", *inspect.signature(spec.describe).parameters]
        assert list(inspect.signature(sync).parameters) == expected
        assert inspect.signature(sync).parameters == inspect.signature(aio).parameters, spec.method_name
        described_doc = inspect.getdoc(spec.describe)
        assert described_doc and inspect.getdoc(sync) == described_doc
        assert inspect.getdoc(aio).startswith(described_doc)
        # Unary calls are coroutines; streams hand back their async iterator at once.
        assert inspect.iscoroutinefunction(aio) == (spec.kind is Kind.UNARY), spec.method_name
        assert not inspect.iscoroutinefunction(sync)
        # The kind agrees with the contract.
        methods = service_descriptor(spec.service).methods_by_name
        rpc = methods[spec.rpc]
        assert (rpc.client_streaming, rpc.server_streaming) == {
            Kind.UNARY: (False, False), Kind.SERVER_STREAM: (False, True), Kind.BIDI: (True, True)}[spec.kind]
        if spec.stream_rpc:
            assert (methods[spec.stream_rpc].client_streaming, methods[spec.stream_rpc].server_streaming) == \
                (False, True)


def _response(service: str, rpc: str):
    return GetMessageClass(service_descriptor(service).methods_by_name[rpc].output_type)()


class _Recorder:
    """Stands in for a client's call machinery: records (service, rpc, request, timeout) and
    answers unary calls with an empty response of the RPC's type."""

    def __init__(self, client) -> None:
        self.calls: list[tuple] = []
        is_async = isinstance(client, AsyncClient)

        def record(service, method, request, timeout):
            if not isinstance(request, (bytes, str)) and hasattr(request, "__next__"):
                request = list(request)  # a bidi call's request iterator
            self.calls.append((service, method, request, timeout))
            return _response(service, method)

        async def record_async(*args):
            return record(*args)

        def record_stream(*args):
            record(*args)
            return "stream"

        client._unary = record_async if is_async else record
        client._stream = client._bidi = record_stream


@pytest.mark.parametrize("spec", _methods.METHODS, ids=lambda spec: spec.method_name)
def test_both_clients_send_the_same_request(spec):
    args, kwargs = SAMPLES[spec.method_name]
    variants = [({}, spec.rpc)] + ([({"stream": True}, spec.stream_rpc)] if spec.stream_rpc else [])
    with Client("127.0.0.1:1", timeout=7.0) as client:
        recorder = _Recorder(client)
        target = client.models if spec.group else client
        sync_results = [getattr(target, spec.method_name)(*args, **kwargs, **extra) for extra, _ in variants]

    async def run_async():
        async with AsyncClient("127.0.0.1:1", timeout=7.0) as aclient:
            arecorder = _Recorder(aclient)
            atarget = aclient.models if spec.group else aclient
            method = getattr(atarget, spec.method_name)
            results = []
            for extra, _ in variants:
                result = method(*args, **kwargs, **extra)
                results.append(await result if inspect.isawaitable(result) else result)
            return arecorder.calls, results

    async_calls, async_results = asyncio.run(run_async())
    assert recorder.calls == async_calls
    assert [(service, rpc) for service, rpc, _, _ in recorder.calls] == [(spec.service, rpc) for _, rpc in variants]
    assert all(timeout is None for *_, timeout in recorder.calls), "no timeout= given: the client's default applies"
    for (_, rpc, request, _), (_, expected) in zip(recorder.calls, variants):
        methods = service_descriptor(spec.service).methods_by_name
        requests = request if isinstance(request, list) else [request]
        assert requests and all(r.DESCRIPTOR == methods[expected].input_type for r in requests)
    assert sync_results == async_results
    if spec.unpack is not None:
        assert sync_results[0] == spec.unpack(_response(spec.service, spec.rpc))


# --- one retry and deadline policy ------------------------------------------------------------

class _Failure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "scripted") -> None:
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return ()


class _ScriptedRpc:
    """A stub method whose successive calls fail with the scripted codes, then answer; a
    stream yields `before` messages before failing."""

    def __init__(self, script: list[grpc.StatusCode | None], *, is_async: bool, stream: bool, before: int = 0):
        self.script, self.is_async, self.stream, self.before = list(script), is_async, stream, before
        self.timeouts: list[float | None] = []

    def __call__(self, request, *, timeout, metadata):
        self.timeouts.append(timeout)
        outcome = self.script.pop(0) if self.script else None
        if self.stream:
            return _ScriptedCall(outcome, self.before)
        if self.is_async:
            async def answer():
                if outcome is not None:
                    raise _Failure(outcome)
                return "ok"
            return answer()
        if outcome is not None:
            raise _Failure(outcome)
        return "ok"

    def future(self, request, *, timeout, metadata):
        """The sync client's unary calls (a future, so a failed list can cancel them)."""
        try:
            answer, failure = self(request, timeout=timeout, metadata=metadata), None
        except _Failure as error:
            answer, failure = None, error
        return _ScriptedFuture(answer, failure)


class _ScriptedFuture:
    def __init__(self, answer, failure) -> None:
        self.answer, self.failure = answer, failure

    def result(self):
        if self.failure is not None:
            raise self.failure
        return self.answer

    def cancel(self):
        return False


class _ScriptedCall:
    def __init__(self, outcome, before: int) -> None:
        self.outcome, self.before = outcome, before

    def _messages(self):
        yield from range(self.before if self.outcome is not None else 2)
        if self.outcome is not None:
            raise _Failure(self.outcome)

    def __iter__(self):
        return self._messages()

    async def __aiter__(self):
        for message in self._messages():
            yield message

    def cancel(self):
        return False


def _run_policy(is_async: bool, script, *, stream=False, before=0, timeout=10.0, overrun=0.0):
    """(outcome, attempts, waits) of one call through Client's or AsyncClient's loops; each
    wait is recorded, and lasts `overrun` seconds (a busy machine oversleeping)."""
    waits: list[float] = []

    def wait(delay):
        waits.append(delay)
        time.sleep(overrun)

    async def wait_async(delay):
        waits.append(delay)
        await asyncio.sleep(overrun)

    rpc = _ScriptedRpc(script, is_async=is_async, stream=stream, before=before)
    retry = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.01)

    async def call_async(client):
        if stream:
            return [message async for message in client._stream("models", "ListModels", None, None)]
        return await client._unary("models", "ListModels", None, None)

    def call_sync(client):
        if stream:
            return list(client._stream("models", "ListModels", None, None))
        return client._unary("models", "ListModels", None, None)

    async def run_async():
        async with AsyncClient("127.0.0.1:1", timeout=timeout, retry=retry) as client:
            client._stubs.method = lambda service, name: rpc
            client._wait = wait_async
            try:
                return await call_async(client)
            except Exception as error:  # noqa: BLE001 - the outcome under test
                return error

    def run_sync():
        with Client("127.0.0.1:1", timeout=timeout, retry=retry) as client:
            client._stubs.method = lambda service, name: rpc
            client._wait = wait
            try:
                return call_sync(client)
            except Exception as error:  # noqa: BLE001 - the outcome under test
                return error

    outcome = asyncio.run(run_async()) if is_async else run_sync()
    return outcome, len(rpc.timeouts), waits


def _summary(result):
    outcome, attempts, waits = result
    described = (type(outcome).__name__, getattr(outcome, "received", None)) if isinstance(outcome, Exception) \
        else outcome
    return described, attempts, len(waits)


UNAVAILABLE, INVALID = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("case", [
    dict(script=[UNAVAILABLE, UNAVAILABLE, None], expect=("ok", 3, 2)),
    dict(script=[UNAVAILABLE] * 9, expect=(("UnavailableError", None), 4, 3)),
    dict(script=[INVALID], expect=(("InvalidArgumentError", None), 1, 0)),
    dict(script=[UNAVAILABLE, None], stream=True, expect=([0, 1], 2, 1)),
    dict(script=[UNAVAILABLE], stream=True, before=1, expect=(("StreamInterruptedError", 1), 1, 0)),
    dict(script=[UNAVAILABLE, None], timeout=0.02, expect=(("UnavailableError", None), 1, 0)),
    dict(script=[UNAVAILABLE, None], timeout=1.0, overrun=1.2, expect=(("UnavailableError", None), 1, 1)),
], ids=["retried-then-ok", "out-of-attempts", "not-retryable", "stream-before-first", "stream-after-first",
        "no-time-for-another", "wait-overran-the-deadline"])
def test_sync_and_async_calls_follow_the_same_policy(case):
    options = {k: v for k, v in case.items() if k != "expect"}
    sync = _summary(_run_policy(False, **options))
    aio = _summary(_run_policy(True, **options))
    assert sync == aio == case["expect"]



# --- lists of inputs ------------------------------------------------------------------------

def _other(value):
    """A second input of the same kind as a sample input."""
    return value + (b"2" if isinstance(value, bytes) else " (2)")


@pytest.mark.parametrize("spec", [spec for spec in _methods.METHODS if spec.batch], ids=lambda spec: spec.method_name)
def test_a_list_sends_one_request_per_input_in_both_clients(spec):
    """Each batch parameter given as a list sends what calls on its items one by one send, in
    order (max_concurrency=1), and the result is the list of their results."""
    args, kwargs = SAMPLES[spec.method_name]
    names = list(inspect.signature(spec.describe).parameters)
    for listed in spec.batch:
        position = names.index(listed)
        single_args = [list(args), [*args[:position], _other(args[position]), *args[position + 1:]]]
        batch_args = [*args[:position], [args[position], _other(args[position])], *args[position + 1:]]

        with Client("127.0.0.1:1", max_concurrency=1) as client:
            one_by_one = _Recorder(client)
            singles = [getattr(client, spec.method_name)(*a, **kwargs) for a in single_args]
        with Client("127.0.0.1:1", max_concurrency=1) as client:
            batched = _Recorder(client)
            results = getattr(client, spec.method_name)(*batch_args, **kwargs)

        async def run_async():
            async with AsyncClient("127.0.0.1:1", max_concurrency=1) as aclient:
                recorder = _Recorder(aclient)
                return recorder, await getattr(aclient, spec.method_name)(*batch_args, **kwargs)

        async_batched, async_results = asyncio.run(run_async())
        assert len(one_by_one.calls) == 2
        assert batched.calls == one_by_one.calls == async_batched.calls, (spec.method_name, listed)
        assert results == singles == async_results


def test_items_of_pairs_lists_and_repeats_single_values():
    from pipeserve_client import InputError

    assert _methods.items_of("m", {"text": "a"}) is None
    assert _methods.items_of("m", {"text": ["a", "b"]}) == [{"text": "a"}, {"text": "b"}]
    assert _methods.items_of("m", {"text": ("a",)}) == [{"text": "a"}]
    assert _methods.items_of("m", {"text": []}) == []
    assert _methods.items_of("qa", {"question": "q", "context": ["c1", "c2"]}) == \
        [{"question": "q", "context": "c1"}, {"question": "q", "context": "c2"}]
    assert _methods.items_of("qa", {"question": ["q1", "q2"], "context": ["c1", "c2"]}) == \
        [{"question": "q1", "context": "c1"}, {"question": "q2", "context": "c2"}]
    with pytest.raises(InputError, match=r"lists of different lengths \(question: 2, context: 3\)"):
        _methods.items_of("qa", {"question": ["q1", "q2"], "context": ["c1", "c2", "c3"]})
    with pytest.raises(InputError, match="takes one input"):
        _methods.items_of("transcribe", {"audio": [b"a"]}, stream=True)
    assert _methods.items_of("transcribe", {"audio": b"a"}, stream=True) is None
