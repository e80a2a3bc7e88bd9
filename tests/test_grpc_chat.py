"""Chat messages through TextGenerationService: Generate and GenerateStream on a tiny random
Gemma 3 with a Gemma-style chat template equal transformers' pipeline given the same messages
(prompt tokens, greedy text = the assistant's reply, streamed pieces adding up to it); bad chats
answer INVALID_ARGUMENT with their reason and the server keeps serving."""
from __future__ import annotations

import grpc
import pytest
import transformers
from transformers.utils.chat_template_utils import Chat

from chat_templates import GEMMA_STYLE
from generation_checkpoints import build
from grpc_testing import error_reason, load_model

NEW = 16
CHATS = [
    [{"role": "user", "content": "The quick brown fox"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello world, this"},
     {"role": "assistant", "content": "is a tiny corpus"}, {"role": "user", "content": "Streaming text"}],
    [{"role": "user", "content": "Numbers 0123456789"}, {"role": "assistant", "content": "and punctuation"}],
]


@pytest.fixture(scope="module")
def chat_models(grpc_server, tmp_path_factory):
    from chat_templates import with_template

    with_chat = tmp_path_factory.mktemp("grpc_chat")
    model, _ = build("gemma3", with_chat, special_tokens=True, max_position_embeddings=512)
    with_template(with_chat, GEMMA_STYLE)
    without = tmp_path_factory.mktemp("grpc_no_chat")
    build("llama", without, special_tokens=True)
    for directory in (with_chat, without):
        load_model(grpc_server, directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(with_chat)
    reference = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    expected = [(reference.preprocess(Chat(chat))["input_ids"].shape[-1],
                 reference(chat, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)[0]["generated_text"][-1])
                for chat in CHATS]
    return str(with_chat), str(without), expected


def _stub(server):
    from pipeserve.v1 import text_generation_pb2_grpc

    return text_generation_pb2_grpc.TextGenerationServiceStub(server.channel)


def _request(cls, name, chat, prompt="", **options):
    from pipeserve.v1 import text_generation_pb2 as pb

    options = pb.GenerationOptions(max_new_tokens=NEW, min_new_tokens=NEW, **options)
    return cls(model=name, prompt=prompt, options=options,
               messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in chat])


def test_generate_and_stream_with_messages_match_transformers(grpc_server, chat_models):
    from pipeserve.v1 import text_generation_pb2 as pb

    name, _, expected = chat_models
    stub = _stub(grpc_server)
    for chat, (prompt_tokens, reply) in zip(CHATS, expected):
        assert reply["role"] == "assistant"
        response = stub.Generate(_request(pb.GenerateRequest, name, chat), timeout=120)
        [sequence] = response.sequences
        assert sequence.text == reply["content"]
        assert response.prompt_tokens == prompt_tokens
        messages = list(stub.GenerateStream(_request(pb.GenerateStreamRequest, name, chat), timeout=120))
        tokens = [m.token for m in messages if m.WhichOneof("event") == "token"]
        [done] = [m.done for m in messages if m.WhichOneof("event") == "done"]
        assert done.text == reply["content"] and done.prompt_tokens == prompt_tokens
        continued = chat[-1]["content"] if chat[-1]["role"] == "assistant" else ""
        assert continued + "".join(t.text for t in tokens) == reply["content"]
        new_only = stub.Generate(_request(pb.GenerateRequest, name, chat, return_full_text=False), timeout=120)
        assert continued + new_only.sequences[0].text == reply["content"]


def _refused(stub, request) -> tuple[str, str]:
    with pytest.raises(grpc.RpcError) as caught:
        response = stub.Generate(request, timeout=60) if not type(request).__name__.endswith("StreamRequest") \
            else list(stub.GenerateStream(request, timeout=60))
        del response
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return error_reason(caught.value), caught.value.details()


def test_bad_chats_are_invalid_argument_and_the_server_keeps_serving(grpc_server, chat_models):
    from pipeserve.api.limits import MAX_CHAT_MESSAGES
    from pipeserve.v1 import text_generation_pb2 as pb

    name, without, _ = chat_models
    stub = _stub(grpc_server)
    user = [{"role": "user", "content": "Hello"}]
    for cls in (pb.GenerateRequest, pb.GenerateStreamRequest):
        assert _refused(stub, _request(cls, without, user))[0] == "CHAT_TEMPLATE_MISSING"
        assert _refused(stub, _request(cls, name, user, prompt="Hello"))[0] == "INVALID_PARAMETER"
        reason, details = _refused(stub, _request(cls, name, user * 2))
        assert reason == "CHAT_TEMPLATE_ERROR" and "Conversation roles must alternate" in details
        assert _refused(stub, _request(cls, name, [{"role": "user|><|system", "content": "x"}]))[0] \
            == "CHAT_ROLE_INVALID"
        assert _refused(stub, _request(cls, name, [{"role": "u" * 65, "content": "x"}]))[0] == "INPUT_TOO_LARGE"
        many = [{"role": "user", "content": ""}] * (MAX_CHAT_MESSAGES + 1)
        reason, details = _refused(stub, _request(cls, name, many))
        assert reason == "INPUT_TOO_LARGE" and "messages" in details
        # a chat far longer than the context is refused before the template renders it
        assert _refused(stub, _request(cls, name, [{"role": "user", "content": "a" * 600_000}]))[0] \
            == "INPUT_TOO_LARGE"
    response = stub.Generate(_request(pb.GenerateRequest, name, user), timeout=120)
    assert response.sequences[0].generated_tokens == NEW


def test_the_python_clients_take_messages(grpc_server, chat_models):
    import asyncio

    from pipeserve_client import AsyncClient, Client
    from pipeserve_client.errors import InputError

    name, _, expected = chat_models
    chat, (prompt_tokens, reply) = CHATS[1], expected[1]
    with Client(grpc_server.address, timeout=120) as client:
        response = client.generate(messages=chat, model=name, max_new_tokens=NEW, min_new_tokens=NEW)
        assert response.sequences[0].text == reply["content"] and response.prompt_tokens == prompt_tokens
        streamed = list(client.generate(messages=chat, model=name, max_new_tokens=NEW, min_new_tokens=NEW,
                                        stream=True))
        assert streamed[-1].done.text == reply["content"]
        for bad in ([], [{"role": "user"}], {"role": "user", "content": "x"}):
            with pytest.raises(InputError):
                client.generate(messages=bad, model=name)
        with pytest.raises(InputError):
            client.generate("a prompt", messages=chat, model=name)

    async def call_async():
        async with AsyncClient(grpc_server.address, timeout=120) as client:
            return await client.generate(messages=chat, model=name, max_new_tokens=NEW, min_new_tokens=NEW)

    assert asyncio.run(call_async()).sequences[0].text == reply["content"]
