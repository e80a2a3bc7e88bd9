"""Gemma 3 through TextGenerationService: a tiny random checkpoint whose local layers have a
4-position window, prompts of different lengths (one longer than the window) generated at once
(Generate and GenerateStream share decoding steps), each equal to transformers' pipeline."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import transformers

from generation_checkpoints import GEMMA3_SMALL, build
from grpc_testing import load_model

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Hello", "Numbers 0123456789 and punctuation"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def gemma(grpc_server, tmp_path_factory):
    directory = tmp_path_factory.mktemp("grpc_gemma3")
    model, _ = build("gemma3", directory, special_tokens=True)
    load_model(grpc_server, directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    reference = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    expected = [reference(p, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)[0]["generated_text"]
                for p in PROMPTS]
    assert len(tokenizer(PROMPTS[0])["input_ids"]) > GEMMA3_SMALL["sliding_window"]
    return str(directory), tokenizer, expected


def _stub(server):
    from pipeserve.v1 import text_generation_pb2_grpc

    return text_generation_pb2_grpc.TextGenerationServiceStub(server.channel)


def _generate(server, name, prompt):
    from pipeserve.v1 import text_generation_pb2 as pb

    options = pb.GenerationOptions(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    return _stub(server).Generate(pb.GenerateRequest(model=name, prompt=prompt, options=options), timeout=120)


def _stream(server, name, prompt):
    from pipeserve.v1 import text_generation_pb2 as pb

    options = pb.GenerationOptions(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    return list(_stub(server).GenerateStream(pb.GenerateStreamRequest(model=name, prompt=prompt, options=options),
                                             timeout=120))


def test_generate_and_stream_batched_match_transformers(grpc_server, gemma):
    name, tokenizer, expected = gemma
    with ThreadPoolExecutor(len(PROMPTS) * 2) as pool:
        unary = [pool.submit(_generate, grpc_server, name, p) for p in PROMPTS]
        streams = [pool.submit(_stream, grpc_server, name, p) for p in PROMPTS]
        unary, streams = [f.result() for f in unary], [f.result() for f in streams]
    for prompt, response, messages, text in zip(PROMPTS, unary, streams, expected):
        [sequence] = response.sequences
        assert sequence.text == text
        assert response.prompt_tokens == len(tokenizer(prompt)["input_ids"])  # BOS included
        tokens = [m.token for m in messages if m.WhichOneof("event") == "token"]
        [done] = [m.done for m in messages if m.WhichOneof("event") == "done"]
        assert done.text == text
        assert prompt + "".join(t.text for t in tokens) == text
        assert len(tokens) == done.generated_tokens == sequence.generated_tokens == NEW_TOKENS
