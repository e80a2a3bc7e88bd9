"""The generation engine's step runner alone, over a one-layer attention model small enough to
check by hand: prompt chunks and decoding steps write the cache of their own rows only, and give
the logits an uncached pass over the same tokens gives; plain-argmax rows go through a verified
head, the others through the float32 head; token choice sees the sequence's tokens; the
blocked argmax equals torch.max's first maximum."""
from __future__ import annotations

import torch
from torch import nn

from pipeserve.layers.kv_cache import FullAttention, KVCache
from pipeserve.scheduling.generation import GenerationParams
from pipeserve.scheduling.generation_requests import RequestHandle, Sequence
from pipeserve.scheduling.generation_steps import ARGMAX_BLOCK, StepRunner, first_argmax

VOCAB, WIDTH = 16, 8


class OneLayerLM(nn.Module):
    """Embedding, one single-head attention layer over the cache view, a linear head: the
    engine's CausalLM contract (models/causal_lm.py) with nothing else."""

    num_layers, kv_heads, head_dim, max_positions = 1, 1, WIDTH, 64

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Embedding(self.max_positions, WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)

    def hidden(self, input_ids, cache_view=None, last_only=False):
        view = cache_view or FullAttention(input_ids.shape[0], input_ids.shape[1], input_ids.device)
        x = self.embed(input_ids) + self.position(view.positions.to(input_ids.device))
        q, k, v = (t[:, None] for t in self.qkv(x).chunk(3, dim=-1))  # [B, 1, T, D]
        x = x + view.attend(0, q, k, v)[:, 0]
        return x[:, -1:] if last_only else x

    def forward(self, input_ids, cache_view=None, last_only=False):
        return self.lm_head(self.hidden(input_ids, cache_view, last_only)).float()

    def uncached_next_logits(self, ids: list[int]) -> torch.Tensor:
        return self(torch.tensor([ids]))[0, -1]


def setup(prefill_chunk=512):
    model = OneLayerLM()
    cache = KVCache(1, 1, WIDTH, model.max_positions, max_slots=8)
    return model, cache, StepRunner(model, cache, prefill_chunk=prefill_chunk)


def sequences(runner: StepRunner, cache: KVCache, prompt: list[int], n: int = 1, **options) -> list[Sequence]:
    params = GenerationParams(num_return_sequences=n, **options)
    handle = RequestHandle(prompt, params)
    return [Sequence(handle, i, cache.allocate(), runner.chooser(params, i), text=None, ids=list(prompt))
            for i in range(n)]


def test_a_prompt_passes_in_chunks_and_its_extra_sequences_copy_the_cache():
    model, cache, runner = setup(prefill_chunk=2)
    prompt = [3, 1, 4, 1, 5]
    first = sequences(runner, cache, prompt, n=2, do_sample=True)
    other = sequences(runner, cache, [2, 7, 1, 8, 2])
    group = [first, other]
    with torch.inference_mode():
        assert runner.prefill(group) is None
        assert [cache.lengths[s.slot] for s in first + other] == [2, 0, 2]
        assert runner.prefill(group) is None
        assert not any(s.decoding for s in first + other)
        logits = runner.prefill(group)
    assert logits.shape == (2, VOCAB)
    assert [cache.lengths[s.slot] for s in first + other] == [5, 5, 5]
    assert all(s.decoding for s in first + other)
    torch.testing.assert_close(logits[0], model.uncached_next_logits(prompt))
    torch.testing.assert_close(logits[1], model.uncached_next_logits(other[0].handle.prompt_ids))
    for store in (cache.keys[0], cache.values[0]):
        assert torch.equal(store[first[1].slot, :, :5], store[first[0].slot, :, :5])
    assert runner.steps == 0, "prompt passes are not decoding steps"
    assert first[0].handle.max_batch == 2 and first[0].handle.compute_s > 0


def test_a_decoding_step_advances_only_its_rows():
    model, cache, runner = setup()
    a, idle, b = (sequences(runner, cache, p)[0] for p in ([1, 2, 3], [4, 5], [6, 7, 8, 9]))
    with torch.inference_mode():
        for seq in (a, idle, b):
            runner.prefill([[seq]])
        a.ids.append(10), b.ids.append(11)
        a.last, b.last = 10, 11
        stored_idle = cache.keys[0][idle.slot].clone()
        logits = runner.decode([a, b])
    assert [cache.lengths[s.slot] for s in (a, idle, b)] == [4, 2, 5]
    assert torch.equal(cache.keys[0][idle.slot], stored_idle)
    torch.testing.assert_close(logits[0], model.uncached_next_logits(a.ids))
    torch.testing.assert_close(logits[1], model.uncached_next_logits(b.ids))
    assert runner.steps == 1 and runner.batch_sizes == [2]
    assert a.handle.max_batch == 2 and idle.handle.max_batch == 1


class RecordingHead:
    """A verified head's interface (layers/verified_head.py): scores after the mask; records
    which rows it was given and returns the float32 scores marked by a constant offset."""

    def __init__(self, lm_head: nn.Linear):
        self.weight = lm_head.weight
        self.calls: list[tuple[int, torch.Tensor]] = []

    def scores(self, hidden, mask, exact):
        scores = exact(hidden).float() + 1000.0
        mask(scores)
        self.calls.append((hidden.shape[0], scores.clone()))
        return scores


def test_plain_argmax_rows_take_the_verified_head_the_others_the_float32_head():
    model, cache, runner = setup()
    model.verified_head = RecordingHead(model.lm_head)
    eos = 5
    greedy = sequences(runner, cache, [1, 2], eos_token_ids=(eos,))[0]
    at_least = sequences(runner, cache, [1, 2], eos_token_ids=(eos,), min_new_tokens=3)[0]
    sampled = sequences(runner, cache, [1, 2], do_sample=True, eos_token_ids=(eos,))[0]
    logprobs = sequences(runner, cache, [1, 2], return_logprobs=True)[0]
    rows = [greedy, at_least, sampled, logprobs]
    with torch.inference_mode():
        first = runner.prefill([[s] for s in rows])
        for seq in rows:
            seq.last = 3
        logits = runner.decode(rows)
    # the prompt's last position (TTFT) and the decoding step both screen the argmax-only rows
    [(prompt_rows, prompt_screened), (screened_rows, screened)] = model.verified_head.calls
    assert prompt_rows == 2 and torch.equal(first[:2], prompt_screened)
    assert prompt_screened[1, eos] == -torch.inf, "no end-of-sequence before min_new_tokens, from the first token"
    assert (first[2:] < 500).all()
    assert screened_rows == 2, "greedy and min_new_tokens rows only"
    assert screened[1, eos] == -torch.inf and screened[0, eos] != -torch.inf, "the min_new_tokens rule masked"
    assert torch.equal(logits[:2], screened)
    exact = logits[2:]
    assert (exact < 500).all(), "sampled and log-probability rows read the float32 head"


def test_only_a_prompts_last_chunk_runs_the_head():
    model, cache, runner = setup(prefill_chunk=2)
    calls = []
    model.lm_head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    seq = sequences(runner, cache, [3, 1, 4, 1, 5])[0]
    with torch.inference_mode():
        assert runner.prefill([[seq]]) is None and runner.prefill([[seq]]) is None
        assert calls == []
        logits = runner.prefill([[seq]])
    assert calls == [1]
    torch.testing.assert_close(logits[0], model.uncached_next_logits([3, 1, 4, 1, 5]))


def test_choice_reads_the_sequence_tokens_for_its_penalties():
    _, cache, runner = setup()
    logits = torch.zeros(1, VOCAB)
    logits[0, 4], logits[0, 9] = 3.0, 2.0
    plain = sequences(runner, cache, [4, 4, 1])[0]
    penalised = sequences(runner, cache, [4, 4, 1], repetition_penalty=2.0)[0]
    assert runner.choose(plain, logits).token == 4
    assert runner.choose(penalised, logits).token == 9, "token 4 was in the prompt: 3 / 2 < 2"
    with_logprob = sequences(runner, cache, [1], return_logprobs=True, logprobs=2)[0]
    choice = runner.choose(with_logprob, logits)
    assert choice.token == 4 and [t for t, _ in choice.top] == [4, 9]
    assert abs(choice.logprob - float(torch.log_softmax(logits[0], -1)[4])) < 1e-6


def test_choose_all_takes_one_batched_argmax_and_equals_each_rows_own_choice():
    """Plain greedy rows (min_new_tokens included) share one argmax; sampling, penalty and
    log-probability rows keep their own chooser; every row's token is the one its own chooser
    picks from its row alone."""
    _, cache, runner = setup()
    rows = [
        sequences(runner, cache, [1, 2])[0],
        sequences(runner, cache, [3, 4], min_new_tokens=3, eos_token_ids=(5,))[0],
        sequences(runner, cache, [5, 6], do_sample=True, seed=11, top_k=4)[0],
        sequences(runner, cache, [7], repetition_penalty=1.3)[0],
        sequences(runner, cache, [8, 9], return_logprobs=True, logprobs=2)[0],
        sequences(runner, cache, [2, 2], min_new_tokens=1, eos_token_ids=(5,))[0],
    ]
    logits = torch.randn(len(rows), VOCAB, generator=torch.Generator().manual_seed(2))
    logits[1, 5] = logits[5, 5] = 50.0  # end-of-sequence on top where min_new_tokens forbids it
    logits[0, 2] = logits[0, 9] = 60.0  # a tie: the first maximum, as argmax
    alone_runner = setup()[2]
    alone = [alone_runner.choose(seq, logits[i:i + 1].clone()) for i, seq in
             enumerate(_fresh_copies(alone_runner, rows))]
    chosen = runner.choose_all(rows, logits.clone())
    assert [c.token for c in chosen] == [c.token for c in alone]
    assert chosen[0].token == 2 and chosen[1].token != 5 and chosen[5].token != 5
    assert chosen[4].top == alone[4].top and chosen[4].logprob == alone[4].logprob


def _fresh_copies(runner: StepRunner, rows: list[Sequence]) -> list[Sequence]:
    """The same sequences with their own new choosers (a sampling row's generator starts over)."""
    return [Sequence(s.handle, s.index, s.slot, runner.chooser(s.params, s.index), text=None, ids=list(s.ids))
            for s in rows]


def test_first_argmax_is_the_first_maximum_of_each_row():
    torch.manual_seed(3)
    for vocab in (262_144, 262_208, 3 * ARGMAX_BLOCK + 5, 96):  # whole blocks, a tail, a small vocabulary
        scores = torch.randn(16, vocab)
        top = scores.max() + 1
        scores[1, 7] = scores[1, 5 * ARGMAX_BLOCK % vocab + 3] = top  # a tie across blocks: the first
        scores[2, 10] = scores[2, 11] = top  # a tie inside a block
        scores[3, -1] = top  # the maximum in the last (tail) block
        scores[4] = float("-inf")  # a fully masked row: index 0, as torch.max
        scores[5, vocab // 2] = float("nan")  # a NaN is the maximum, as in torch.max
        scores[6, :vocab // 2] = top  # the first of many equal scores
        for rows in (scores, scores[:1], scores[3:4]):
            assert first_argmax(rows) == rows.max(dim=-1).indices.tolist(), vocab
