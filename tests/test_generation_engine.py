"""The continuous-batching engine: joining between steps, leaving at once, bounds, EOS."""
from __future__ import annotations

import time

import pytest

from generation_checkpoints import build
from harness import load_pipeline

from pipeserve.errors import InvalidInput, QueueFull
from pipeserve.scheduling.generation import GenerationParams
from pipeserve.scheduling.generation_engine import DoneEvent, GenerationEngine, TokenEvent


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    directory = tmp_path_factory.mktemp("engine-gpt2")
    build("gpt2", directory)
    pipeline = load_pipeline(directory)
    yield pipeline
    pipeline.close()


def _params(pipe, **options):
    return pipe.parameters(options)


def _tokens(handle):
    events = list(handle)
    return [e.token for e in events if isinstance(e, TokenEvent)], [e for e in events if isinstance(e, DoneEvent)]


def test_request_joins_a_running_batch_and_matches_running_alone(pipe):
    engine = pipe.engine
    ids_a, ids_b = pipe.encode("The quick brown fox"), pipe.encode("Hello world")
    alone_b, _ = _tokens(engine.submit(ids_b, _params(pipe, max_new_tokens=20, min_new_tokens=20)))
    alone_a, _ = _tokens(engine.submit(ids_a, _params(pipe, max_new_tokens=60, min_new_tokens=60)))

    steps = engine.steps
    a = engine.submit(ids_a, _params(pipe, max_new_tokens=60, min_new_tokens=60))
    iterator = iter(a)
    first = [next(iterator) for _ in range(10)]  # A is running
    b = engine.submit(ids_b, _params(pipe, max_new_tokens=20, min_new_tokens=20))
    joined_b, done_b = _tokens(b)
    rest = list(iterator)
    joined_a = [e.token for e in first + rest if isinstance(e, TokenEvent)]
    assert joined_a == alone_a and joined_b == alone_b
    assert done_b[0].finish_reason == "length"
    assert engine.steps - steps < 60 + 20 - 2, "B decoded in A's steps"
    assert 2 in engine.batch_sizes


def test_cancel_leaves_at_once_and_frees_the_slot(pipe):
    engine = pipe.engine
    handle = engine.submit(pipe.encode("Hello"), _params(pipe, max_new_tokens=100, min_new_tokens=100))
    iterator = iter(handle)
    next(iterator)
    handle.cancel()
    events = list(iterator)
    done = [e for e in events if isinstance(e, DoneEvent)]
    assert done and done[0].finish_reason == "cancelled" and done[0].generated_tokens < 100
    assert engine.active() == 0 and engine.cache.memory_bytes() == 0


def test_eos_ends_a_sequence_unless_ignored(pipe):
    ids = pipe.encode("The quick brown fox")
    greedy, _ = _tokens(pipe.engine.submit(ids, _params(pipe, max_new_tokens=10, min_new_tokens=10)))
    eos = greedy[3]
    params = GenerationParams.from_options({"max_new_tokens": 10}, eos_token_ids=[eos], max_positions=128)
    tokens, [done] = _tokens(pipe.engine.submit(ids, params))
    assert done.finish_reason == "eos_token" and tokens == greedy[:greedy.index(eos) + 1]
    params = GenerationParams.from_options({"max_new_tokens": 10, "ignore_eos": True}, eos_token_ids=[eos],
                                           max_positions=128)
    tokens, [done] = _tokens(pipe.engine.submit(ids, params))
    assert done.finish_reason == "length" and tokens == greedy
    # min_new_tokens forbids the end-of-sequence token until it is reached
    params = GenerationParams.from_options({"max_new_tokens": 10, "min_new_tokens": 8}, eos_token_ids=[eos],
                                           max_positions=128)
    tokens, [done] = _tokens(pipe.engine.submit(ids, params))
    assert eos not in tokens[:8]


def test_queue_and_batch_bounds(pipe):
    engine = GenerationEngine(pipe.model, pipe.tokenizer, special_ids=set(), max_batch_size=1,
                              max_batch_tokens=64, max_queued=2)
    try:
        ids = pipe.encode("Hello")
        with pytest.raises(InvalidInput, match="tokens of cache"):
            engine.submit(ids, _params(pipe, max_new_tokens=100))
        handles = [engine.submit(ids, _params(pipe, max_new_tokens=40, min_new_tokens=40))]
        time.sleep(0.2)  # the first one is running; the next two wait
        handles += [engine.submit(ids, _params(pipe, max_new_tokens=5)) for _ in range(2)]
        with pytest.raises(QueueFull):
            engine.submit(ids, _params(pipe, max_new_tokens=5))
        for handle in handles:
            _, [done] = _tokens(handle)
            assert done.finish_reason == "length"
        assert max(engine.batch_sizes) == 1
        assert engine.cache.memory_bytes() == 0
    finally:
        engine.close()


def test_context_end_finishes_with_length(pipe):
    ids = pipe.encode("word " * 30)[:120]
    assert len(ids) > 40
    tokens, [done] = _tokens(pipe.engine.submit(ids, _params(pipe, max_new_tokens=128)))
    assert done.finish_reason == "length" and len(ids) + len(tokens) == pipe.model.max_positions


def test_prompts_of_equal_length_share_one_prompt_pass(pipe):
    from pipeserve.scheduling.generation_engine import RequestHandle

    prompts = [pipe.encode(p) for p in ("The quick brown fox", "Hello world, this is", "Numbers and punctuation")]
    length = min(len(p) for p in prompts)
    prompts = [p[:length] for p in prompts]
    params = _params(pipe, max_new_tokens=8, min_new_tokens=8)
    alone = [_tokens(pipe.engine.submit(p, params))[0] for p in prompts]
    engine = GenerationEngine(pipe.model, pipe.tokenizer, special_ids=set())
    try:
        # queued before the engine thread starts, so that they join in one admission round
        early = [RequestHandle(p, params) for p in prompts[:2]]
        engine.scheduler.waiting.extend(early)
        last = engine.submit(prompts[2], params)
        together = [_tokens(h)[0] for h in early + [last]]
        assert together == alone
        assert all(h.max_batch == 3 for h in early + [last])
    finally:
        engine.close()


def test_long_prompts_are_passed_in_chunks_between_decoding_steps(pipe):
    engine = GenerationEngine(pipe.model, pipe.tokenizer, special_ids=set(), prefill_chunk=3)
    try:
        long_prompt = pipe.encode("Pipelines serve models; models generate text one token at a time.")
        assert len(long_prompt) > 12
        params = _params(pipe, max_new_tokens=10, min_new_tokens=10)
        assert _tokens(engine.submit(long_prompt, params))[0] == _tokens(pipe.engine.submit(long_prompt, params))[0]

        running = engine.submit(pipe.encode("Hello"), _params(pipe, max_new_tokens=60, min_new_tokens=60))
        iterator = iter(running)
        next(iterator)
        steps = engine.steps
        joining = iter(engine.submit(long_prompt, params))
        next(joining)  # its first token comes after all its prompt chunks...
        chunks = -(-len(long_prompt) // 3)
        assert engine.steps - steps >= chunks - 2, "...each followed by a decoding step of the running stream"
        list(joining)
        list(iterator)
    finally:
        engine.close()


def test_plain_greedy_rows_take_the_verified_head_and_choose_as_float32(pipe):
    import torch

    from pipeserve.layers import verified_head

    if not verified_head.available(torch.ones(1, 1)):
        pytest.skip("oneDNN has no native bfloat16 on this CPU: the head is not installed")
    head = pipe.model.verified_head
    assert head is not None  # GPT-2's head is tied to wte: installed at load
    seen = []
    screen = head.scores

    def spy(hidden, mask, exact):
        out = screen(hidden, mask, exact)
        full = exact(hidden).float()
        mask(full)
        seen.append((torch.equal(out.argmax(-1), full.argmax(-1)), bool((out != full).any()), hidden.shape[0]))
        return out

    ids = pipe.encode("Hello world")
    greedy = _params(pipe, max_new_tokens=12)
    at_least = _params(pipe, max_new_tokens=12, min_new_tokens=12)  # end-of-sequence masked throughout
    sampled = _params(pipe, max_new_tokens=12, do_sample=True, seed=3, top_k=0)

    def run_mixed():
        handles = [pipe.engine.submit(ids, p) for p in (sampled, greedy, greedy, at_least)]
        return [_tokens(h)[0] for h in handles]

    head.scores = spy
    try:
        with_head = run_mixed()
    finally:
        del head.scores
    del pipe.model.verified_head
    try:
        without = run_mixed()
    finally:
        pipe.model.verified_head = head
    assert with_head == without  # the sampled row's draws and the greedy rows' choices alike
    assert with_head[1] == with_head[2]
    assert seen and all(same for same, _, _ in seen)
    assert any(screened for _, screened, _ in seen)  # logits far from the top kept screened values
    assert max(rows for _, _, rows in seen) <= 3  # the sampled row never went through the screen
    assert len(with_head[3]) == 12
