"""TextGenerationService end to end through gRPC on a tiny random GPT-2: Generate equals
transformers' pipeline, GenerateStream's token texts add up to the final text, bad input gets
specific statuses, a crowd of streams is bounded (QUEUE_FULL past the queue), and clients that
vanish mid-stream stop costing anything."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import transformers

from generation_checkpoints import build
from grpc_testing import error_reason, load_model


@pytest.fixture(scope="module")
def gpt2(grpc_server, tmp_path_factory):
    directory = tmp_path_factory.mktemp("grpc_gpt2")
    model, tokenizer = build("gpt2", directory)
    load_model(grpc_server, directory)
    return str(directory), model, tokenizer


def _stub(server):
    from pipeserve.v1 import text_generation_pb2_grpc

    return text_generation_pb2_grpc.TextGenerationServiceStub(server.channel)


def _pipeline(server, name):
    return server.manager.get(name).pipeline


def _wait_idle(pipe, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pipe.engine.active() == 0 and pipe.engine.queued() == 0:
            return True
        time.sleep(0.05)
    return False


def test_generate_matches_transformers(grpc_server, gpt2):
    from pipeserve.v1 import text_generation_pb2 as pb

    name, model, tokenizer = gpt2
    reference = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    expected = reference("Hello world", max_new_tokens=12, min_new_tokens=12, do_sample=False)[0]["generated_text"]
    response = _stub(grpc_server).Generate(pb.GenerateRequest(
        model=name, request_id="g1", prompt="Hello world",
        options=pb.GenerationOptions(max_new_tokens=12, min_new_tokens=12, logprobs=2)), timeout=60)
    assert response.request_id == "g1"
    [sequence] = response.sequences
    assert sequence.text == expected
    assert sequence.finish_reason == pb.FINISH_REASON_LENGTH
    assert sequence.generated_tokens == 12 and len(sequence.tokens) == 12
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in sequence.tokens)
    assert response.prompt_tokens == len(tokenizer("Hello world")["input_ids"])
    assert response.run.model == name and response.run.compute_ms > 0


def test_stream_tokens_add_up_to_final_text(grpc_server, gpt2):
    from pipeserve.v1 import text_generation_pb2 as pb

    name, _, _ = gpt2
    options = pb.GenerationOptions(max_new_tokens=20, do_sample=True, seed=11, num_return_sequences=2,
                                   return_full_text=False)
    messages = list(_stub(grpc_server).GenerateStream(
        pb.GenerateStreamRequest(model=name, request_id="s1", prompt="Café 🙂", options=options), timeout=60))
    assert all(m.request_id == "s1" for m in messages)
    for index in (0, 1):
        mine = [m for m in messages if m.sequence_index == index]
        tokens = [m.token for m in mine if m.WhichOneof("event") == "token"]
        [done] = [m.done for m in mine if m.WhichOneof("event") == "done"]
        assert mine[-1].WhichOneof("event") == "done"
        assert "".join(t.text for t in tokens) == done.text
        assert done.generated_tokens == len(tokens) and done.seed == 11
    whole = _stub(grpc_server).Generate(pb.GenerateRequest(model=name, prompt="Café 🙂", options=options), timeout=60)
    assert [s.text for s in whole.sequences] == [
        [m.done.text for m in messages if m.WhichOneof("event") == "done" and m.sequence_index == i][0] for i in (0, 1)]


def test_stop_sequence_over_grpc(grpc_server, gpt2):
    from pipeserve.v1 import text_generation_pb2 as pb

    name, _, _ = gpt2
    stub = _stub(grpc_server)
    full = stub.Generate(pb.GenerateRequest(model=name, prompt="The quick", options=pb.GenerationOptions(
        max_new_tokens=20, min_new_tokens=20, return_full_text=False)), timeout=60).sequences[0].text
    stop = full[5:8]
    cut = stub.Generate(pb.GenerateRequest(model=name, prompt="The quick", options=pb.GenerationOptions(
        max_new_tokens=20, return_full_text=False, stop=[stop])), timeout=60).sequences[0]
    assert cut.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert cut.text == full[:full.find(stop)]


BAD = [
    ("empty prompt", "", {}, "INVALID_INPUT"),
    ("prompt longer than the context", "word " * 400, {}, "INPUT_TOO_LARGE"),
    ("huge prompt", "x" * 2_000_000, {}, "INPUT_TOO_LARGE"),
    ("max_new_tokens 0", "Hi", {"max_new_tokens": 0}, "INVALID_PARAMETER"),
    ("max_new_tokens 10^9", "Hi", {"max_new_tokens": 10 ** 9}, "INVALID_PARAMETER"),
    ("temperature < 0", "Hi", {"temperature": -0.5, "do_sample": True}, "INVALID_PARAMETER"),
    ("top_p 0", "Hi", {"top_p": 0.0, "do_sample": True}, "INVALID_PARAMETER"),
    ("top_p > 1", "Hi", {"top_p": 1.5, "do_sample": True}, "INVALID_PARAMETER"),
    ("typical_p > 1", "Hi", {"typical_p": 2.0, "do_sample": True}, "INVALID_PARAMETER"),
    ("repetition_penalty 0", "Hi", {"repetition_penalty": 0.0}, "INVALID_PARAMETER"),
    ("min > max", "Hi", {"min_new_tokens": 5, "max_new_tokens": 2}, "INVALID_PARAMETER"),
    ("greedy with several sequences", "Hi", {"num_return_sequences": 3}, "INVALID_PARAMETER"),
    ("too many sequences", "Hi", {"num_return_sequences": 1000, "do_sample": True}, "INVALID_PARAMETER"),
    ("empty stop string", "Hi", {"stop": [""]}, "INVALID_PARAMETER"),
    ("too many alternatives", "Hi", {"logprobs": 1000}, "INVALID_PARAMETER"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_bad_input_gets_invalid_argument(grpc_server, gpt2, case, rpc):
    from pipeserve.v1 import text_generation_pb2 as pb

    name, _, _ = gpt2
    _, prompt, options, reason = case
    cls = pb.GenerateRequest if rpc == "Generate" else pb.GenerateStreamRequest
    request = cls(model=name, prompt=prompt, options=pb.GenerationOptions(**options))
    with pytest.raises(grpc.RpcError) as info:
        result = getattr(_stub(grpc_server), rpc)(request, timeout=30)
        if rpc == "GenerateStream":
            list(result)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert error_reason(info.value) == reason
    assert info.value.details()  # a message saying what is wrong


def test_invalid_utf8_in_stop_string(grpc_server, gpt2):
    from pipeserve.v1 import text_generation_pb2 as pb

    name, _, _ = gpt2
    # Python cannot put invalid UTF-8 into a str field: patch the encoded bytes instead.
    encoded = pb.GenerateRequest(model=name, prompt="Hi", options=pb.GenerationOptions(stop=["ZZ"])).SerializeToString()
    assert encoded.count(b"ZZ") == 1
    raw = encoded.replace(b"ZZ", b"\xff\xfe")
    call = grpc_server.channel.unary_unary("/pipeserve.v1.TextGenerationService/Generate",
                                           request_serializer=lambda b: b,
                                           response_deserializer=pb.GenerateResponse.FromString)
    with pytest.raises(grpc.RpcError) as info:
        call(raw, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (info.value.code(), info.value.details())
    # ... and the server keeps serving
    ok = _stub(grpc_server).Generate(pb.GenerateRequest(model=name, prompt="Hi", options=pb.GenerationOptions(
        max_new_tokens=2)), timeout=30)
    assert ok.sequences[0].generated_tokens == 2


def test_many_concurrent_streams_are_bounded_and_share_steps(grpc_server, gpt2):
    from pipeserve.v1 import text_generation_pb2 as pb, text_generation_pb2_grpc

    name, _, _ = gpt2
    pipe = _pipeline(grpc_server, name)
    steps_before = pipe.engine.steps
    streams = 1000  # far over the 256 queued + 32 active the engine admits

    async def one(stub, i):
        request = pb.GenerateStreamRequest(model=name, prompt=f"Hello {i}", options=pb.GenerationOptions(
            max_new_tokens=6, min_new_tokens=6))
        try:
            messages = [m async for m in stub.GenerateStream(request, timeout=120)]
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details()
        return "ok", messages

    async def crowd():
        async with grpc.aio.insecure_channel(grpc_server.address) as channel:
            stub = text_generation_pb2_grpc.TextGenerationServiceStub(channel)
            return await asyncio.gather(*(one(stub, i) for i in range(streams)))

    results = asyncio.run(crowd())
    ok = [r for r in results if r[0] == "ok"]
    refused = [r for r in results if r[0] != "ok"]
    assert ok, "some streams complete"
    assert all(code == grpc.StatusCode.RESOURCE_EXHAUSTED for code, _ in refused), refused[:3]
    for _, messages in ok:
        assert messages[-1].done.generated_tokens == 6
    tokens = 6 * len(ok)
    assert pipe.engine.steps - steps_before < tokens / 2, "concurrent streams share decoding steps"
    cache = pipe.engine.cache
    # memory stays bounded: never more than max_batch_size slots of the model's context
    assert cache.peak_bytes <= pipe.engine.max_batch_size * pipe.model.max_positions * cache.bytes_per_token()
    assert max(pipe.engine.batch_sizes) > 1
    assert _wait_idle(pipe) and pipe.engine.cache.memory_bytes() == 0
    again = _stub(grpc_server).Generate(pb.GenerateRequest(model=name, prompt="Hi", options=pb.GenerationOptions(
        max_new_tokens=2)), timeout=30)
    assert again.sequences[0].generated_tokens == 2


def test_vanishing_clients_stop_costing(grpc_server, gpt2):
    from pipeserve.v1 import text_generation_pb2 as pb

    name, _, _ = gpt2
    pipe = _pipeline(grpc_server, name)
    stub = _stub(grpc_server)
    long = pb.GenerationOptions(max_new_tokens=120, min_new_tokens=120)
    calls = [stub.GenerateStream(pb.GenerateStreamRequest(model=name, prompt="Hello", options=long), timeout=60)
             for _ in range(4)]
    for call in calls:
        next(call)
        next(call)  # mid-stream
    for call in calls:
        call.cancel()
    # a deadline that passes mid-stream
    with pytest.raises(grpc.RpcError) as info:
        for _ in stub.GenerateStream(pb.GenerateStreamRequest(model=name, prompt="Hello", options=long), timeout=0.3):
            time.sleep(0.05)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _wait_idle(pipe), "cancelled sequences leave the batch"
    assert pipe.engine.cache.memory_bytes() == 0, "and free their cache"


def test_server_prompt_token_limit(gpt2):
    path = gpt2[0]
    """max_prompt_tokens bounds prompts below the model's context: INVALID_ARGUMENT / INPUT_TOO_LARGE."""
    from grpc_testing import make_server
    from pipeserve.v1 import text_generation_pb2 as pb

    server = make_server(max_prompt_tokens=4)
    try:
        load_model(server, path)
        stub = _stub(server)
        assert stub.Generate(pb.GenerateRequest(model=path, prompt="hello",
                                                options=pb.GenerationOptions(max_new_tokens=2)), timeout=60).sequences
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(pb.GenerateRequest(model=path, prompt="hello " * 20,
                                             options=pb.GenerationOptions(max_new_tokens=2)), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_reason(info.value) == "INPUT_TOO_LARGE" and "at most 4" in info.value.details()
    finally:
        server.stop()
