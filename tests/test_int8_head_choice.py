"""The int8-screened head's choice without dense scores (layers/int8_head.py `choose`) and the
decoding step that uses it (scheduling/generation_steps.py `decode_argmax`): each row's token is
the first maximum of the dense scores `scores` gives, so the float32 argmax, through near-ties,
masks, a fully masked row, extreme scales, the float32 fallback and a saturating soft cap; and a
step of plain greedy rows chooses, and advances the cache, as decode + choose_all do."""
from __future__ import annotations

import math

import pytest
import torch

from pipeserve.layers import int8_head
from test_generation_steps import VOCAB as STEP_VOCAB, sequences, setup as runner_setup
from test_int8_head import (VOCAB, _counting_projection, _flat_head, _hidden, _listed_and_unlisted_masks,
                            _no_mask, _weight)

pytestmark = pytest.mark.skipif(not int8_head.int8_screen_available(torch.ones(1, 1)),
                                reason="no int8 kernel with VNNI on this CPU: the head is not used")


def _dense_choice(head, h, mask, exact, finish=None) -> torch.Tensor:
    scores = head.scores(h, mask, exact)
    return (finish(scores) if finish is not None else scores).max(dim=-1).indices


@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("scale", [3.0, 30.0, 300.0])  # flat to sharply peaked logits
def test_the_choice_is_the_dense_scores_first_maximum_and_the_float32_argmax(outliers, scale):
    weight = _weight(outliers=outliers)
    exact = lambda x: x @ weight.T  # noqa: E731
    head = int8_head.Int8ScreenedHead(weight, max_rescored=VOCAB)
    for seed in range(4):
        h = _hidden(16, scale, seed=seed)
        chosen = head.choose(h, _no_mask, exact)
        assert chosen.dtype == torch.int64 and chosen.shape == (16,)
        assert torch.equal(chosen, _dense_choice(head, h, _no_mask, exact))
        assert torch.equal(chosen, exact(h).argmax(-1))


def test_near_ties_and_exact_ties_choose_as_the_dense_scores():
    """Twin rows 1e-4 apart (below int8's resolution) and exact duplicates: the float32 order
    decides, and among equal logits the lowest token id, as max over the dense row does."""
    g = torch.Generator().manual_seed(5)
    weight = _weight()
    base = torch.arange(0, VOCAB, VOCAB // 40)
    sign = torch.randint(0, 2, (len(base), 1), generator=g) * 2 - 1
    weight[base + 1] = weight[base] * (1 + 1e-4 * sign)
    weight[base[::2] + 2] = weight[base[::2]]  # exact duplicates of every other base row
    head = int8_head.Int8ScreenedHead(weight, max_rescored=VOCAB)
    h = weight[base] * 400
    exact = lambda x: x @ weight.T  # noqa: E731
    chosen = head.choose(h, _no_mask, exact)
    assert torch.equal(chosen, _dense_choice(head, h, _no_mask, exact))
    expected = (h.double() @ weight.double().T).argmax(-1)
    duplicated = expected[::2] == base[::2]  # a duplicated winner: its lower id wins, as in float32
    assert duplicated.any() and torch.equal(chosen[::2][duplicated], base[::2][duplicated])
    assert ((chosen == base) | (chosen == base + 1) | (chosen == base + 2)).all()


def test_masks_listed_or_not_and_a_fully_masked_row():
    weight = _weight(outliers=True)
    exact = lambda x: x @ weight.T  # noqa: E731
    head = int8_head.Int8ScreenedHead(weight, max_rescored=VOCAB)
    h = _hidden(3, 30.0)
    _, masks, expected = _listed_and_unlisted_masks(exact(h))
    for mask in masks:
        chosen = head.choose(h, mask, exact)
        assert torch.equal(chosen, expected.argmax(-1))
        assert torch.equal(chosen, _dense_choice(head, h, mask, exact))

    def everything(scores):
        scores[1, :] = -math.inf

    chosen = head.choose(h, everything, exact)
    assert chosen[1] == 0 == _dense_choice(head, h, everything, exact)[1]


@pytest.mark.parametrize("weight_scale", [1e-4, 1e3])
@pytest.mark.parametrize("hidden_scale", [1e-3, 1e4])
def test_extreme_scales(weight_scale, hidden_scale):
    weight = _weight(seed=3, outliers=True) * weight_scale
    head = int8_head.Int8ScreenedHead(weight, max_rescored=VOCAB)
    h = _hidden(3, hidden_scale, seed=4)
    h[0, 7] *= 300
    h[2] = weight[11] * hidden_scale * 50 / weight_scale
    exact = lambda x: x @ weight.T  # noqa: E731
    assert torch.equal(head.choose(h, _no_mask, exact), (h.double() @ weight.double().T).argmax(-1))


def test_a_saturating_finish_ties_the_top_logits_as_in_the_dense_scores():
    """A soft cap that rounds the rescored logits to one value: the first of them wins, as the
    dense scores' maximum after the cap (what the engine's step did before `choose`); without the
    cap the largest raw logit would. (Tokens outside the rescored set are -inf in both, so a cap
    this steep is not the float32 head's capped argmax; a real cap, Gemma 2's 30 over logits of
    tens, rounds together only logits within float32's resolution, all of them rescored.)"""
    weight = _weight()
    exact = lambda x: x @ weight.T  # noqa: E731
    head = int8_head.Int8ScreenedHead(weight, max_rescored=VOCAB)
    h = _hidden(8, 300.0, seed=7)
    raw = exact(h)

    def cap(x):
        return torch.tanh(x / 0.5) * 0.5  # saturates: tanh rounds every logit above ~9 to 1

    chosen = head.choose(h, _no_mask, exact, cap)
    assert torch.equal(chosen, _dense_choice(head, h, _no_mask, exact, cap))
    assert not torch.equal(chosen, raw.argmax(-1)), "the cap made ties that the first maximum breaks"


def test_too_many_candidates_take_the_float32_projection():
    weight, head = _flat_head()
    flat = _hidden(2, 1.0)
    calls = []
    exact = _counting_projection(weight, calls)
    assert torch.equal(head.choose(flat, _no_mask, exact), (flat @ weight.T).argmax(-1))
    assert calls and head._fallback_rate > 0


def _screened_runner():
    model, cache, runner = runner_setup()
    model.verified_head = int8_head.Int8ScreenedHead(model.lm_head.weight, max_rescored=STEP_VOCAB)
    return model, cache, runner


def test_a_step_of_greedy_rows_chooses_and_advances_as_decode_and_choose_all():
    eos = 5
    prompts = ([1, 2, 3], [4, 6], [7, 8, 9, 10])
    runs = []
    for argmax_path in (False, True):
        model, cache, runner = _screened_runner()
        rows = [sequences(runner, cache, list(p), eos_token_ids=(eos,), min_new_tokens=3 * (i == 1))[0]
                for i, p in enumerate(prompts)]
        tokens = []
        with torch.inference_mode():
            for seq in rows:
                runner.prefill([[seq]])
                seq.last = 3
            for _ in range(4):
                if argmax_path:
                    chosen = runner.decode_argmax(rows)
                else:
                    chosen = [c.token for c in runner.choose_all(rows, runner.decode(rows))]
                for seq, token in zip(rows, chosen):
                    seq.ids.append(token)
                    seq.last = token
                    seq.generated += 1
                tokens.append(chosen)
        runs.append((tokens, [cache.lengths[s.slot] for s in rows], runner.steps, runner.batch_sizes,
                     [s.handle.max_batch for s in rows]))
    assert runs[0] == runs[1]
    assert all(step[1] != eos for step in runs[1][0][:2]), "min_new_tokens masked the end of sequence"


def test_a_step_with_a_row_that_is_not_plain_argmax_runs_nothing():
    model, cache, runner = _screened_runner()
    greedy = sequences(runner, cache, [1, 2])[0]
    sampled = sequences(runner, cache, [1, 2], do_sample=True)[0]
    with torch.inference_mode():
        for seq in (greedy, sampled):
            runner.prefill([[seq]])
        assert runner.decode_argmax([greedy, sampled]) is None
    assert runner.steps == 0 and cache.lengths[greedy.slot] == 2
    model.verified_head = None
    assert runner.decode_argmax([greedy]) is None
