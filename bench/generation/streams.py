"""The client side of the generation benchmarks: concurrent GenerateStream calls over a real gRPC
channel, timed per stream; one request or a crowd submitted to a text-generation pipeline's
engine in process; and how two greedy token sequences compare.

Used by run.py (its client process, spawned, and its in-process runners), real_gemma.py (the
bench process itself, the server being another process) and gemma_step.py. The gRPC side needs
the generated protobuf code (clients/python or service/ on the path) and grpc; the engine side
the pipeline it is given.
"""
from __future__ import annotations

import asyncio
import threading
import time


def grpc_crowd(address: str, model: str, prompt_texts: list[str], new_tokens: int) -> tuple[float, list[dict]]:
    """One concurrent GenerateStream call per prompt, greedy (the server's default), exactly
    `new_tokens` tokens (min_new_tokens = max_new_tokens), the text without the prompt. Returns the wall time of the whole
    crowd and, per stream: "ids" (token ids), "ttft_s" (call start to the first token event),
    "seconds" (call start to the last message), "prompt_tokens" (as the server counted them,
    from the final message) and "text"."""
    import grpc

    from pipeserve.v1 import text_generation_pb2 as pb, text_generation_pb2_grpc

    options = pb.GenerationOptions(max_new_tokens=new_tokens, min_new_tokens=new_tokens, return_full_text=False)

    async def one(stub, text):
        start = time.perf_counter()
        first = None
        ids = []
        done = None
        async for message in stub.GenerateStream(pb.GenerateStreamRequest(
                model=model, prompt=text, options=options), timeout=3600):
            event = message.WhichOneof("event")
            if event == "token":
                ids.append(message.token.id)
                if first is None:
                    first = time.perf_counter() - start
            elif event == "done":
                done = message.done
        return {"ids": ids, "ttft_s": first, "seconds": time.perf_counter() - start,
                "prompt_tokens": done.prompt_tokens if done else None, "text": done.text if done else None}

    async def crowd():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = text_generation_pb2_grpc.TextGenerationServiceStub(channel)
            start = time.perf_counter()
            results = await asyncio.gather(*(one(stub, text) for text in prompt_texts))
            return time.perf_counter() - start, results

    return asyncio.run(crowd())


def engine_once(pipe, prompt: list[int], new_tokens: int) -> tuple[float | None, float, list[int]]:
    """One request on the pipeline's engine, exactly `new_tokens` greedy tokens: (seconds to the
    first token, seconds in all, the token ids)."""
    from pipeserve.scheduling.generation_engine import TokenEvent

    params = pipe.parameters({"max_new_tokens": new_tokens, "min_new_tokens": new_tokens})
    start = time.perf_counter()
    first = None
    tokens = []
    for event in pipe.engine.submit(prompt, params):
        if isinstance(event, TokenEvent):
            tokens.append(event.token)
            if first is None:
                first = time.perf_counter() - start
    return first, time.perf_counter() - start, tokens


def engine_crowd(pipe, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    """All prompts submitted at once (the engine's continuous batching decodes them together),
    each drained by its own thread: (seconds in all, each request's token ids)."""
    from pipeserve.scheduling.generation_engine import TokenEvent

    params = pipe.parameters({"max_new_tokens": new_tokens, "min_new_tokens": new_tokens})
    start = time.perf_counter()
    handles = [pipe.engine.submit(p, params) for p in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]

    def drain(i):
        tokens[i] = [e.token for e in handles[i] if isinstance(e, TokenEvent)]

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, tokens


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token sequences differ (a length difference counts at the
    shorter one's end), or None when they are equal."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))
