"""Whisper's token decoders one at a time (pipelines/whisper/token_decoders.py), fed by hand:
scores go in, the chosen tokens, cache reorder, stopping and final results come out."""
from __future__ import annotations

import math

import pytest
import torch

from pipeserve.pipelines.whisper.token_decoders import BeamSearchDecoder, GreedyDecoder

EOS, PAD = 3, 9


def logprobs(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).log().float()


def test_greedy_takes_the_best_token_with_its_log_probability():
    d = GreedyDecoder(rows=2, max_new=10, eos=EOS, pad=PAD)
    assert d.screened_head_ok
    step = d.update(torch.tensor([[0.0, 2.0, 1.0, 0.0], [3.0, 0.0, 0.0, 0.0]]))
    assert step.tokens == [1, 0] and step.reorder is None and not step.done
    assert d.sequences == [[1], [0]]
    row0 = math.log(math.exp(2) / (math.exp(2) + math.exp(1) + 2))
    row1 = math.log(math.exp(3) / (math.exp(3) + 3))
    assert d.logprobs[0][0] == pytest.approx(row0, abs=1e-6)
    assert d.logprobs[1][0] == pytest.approx(row1, abs=1e-6)


def test_greedy_row_ending_in_eos_is_padded_and_the_window_ends_when_all_have():
    d = GreedyDecoder(rows=2, max_new=10, eos=EOS, pad=PAD)
    step = d.update(torch.tensor([[0.0, 0.0, 0.0, 5.0], [0.0, 5.0, 0.0, 0.0]]))
    assert step.tokens == [EOS, 1] and not step.done
    step = d.update(torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0]]))
    assert step.tokens == [PAD, EOS] and step.done
    assert d.sequences == [[EOS], [1, EOS]]
    results = d.finalize([0.25, 0.5])
    assert [r.tokens for r in results] == [[EOS], [1, EOS]]
    assert [len(r.logprobs) for r in results] == [1, 2]
    assert [r.no_speech_prob for r in results] == [0.25, 0.5]
    assert all(r.sum_logprob is None for r in results)


def test_greedy_stops_at_max_new_tokens():
    d = GreedyDecoder(rows=1, max_new=2, eos=EOS, pad=PAD)
    scores = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert not d.update(scores).done
    assert d.update(scores).done
    assert d.finalize([0.0])[0].tokens == [0, 0]


def test_sampling_draws_only_allowed_tokens_and_records_untempered_log_probabilities():
    d = GreedyDecoder(rows=1, max_new=100, eos=EOS, pad=PAD, temperature=0.5,
                      generator=torch.Generator().manual_seed(0))
    assert not d.screened_head_ok  # a sampled token is not the screen's argmax
    scores = torch.tensor([[0.0, -math.inf, math.log(3.0), -math.inf]])  # P = 1/4, 3/4 (1/10, 9/10 at 0.5)
    for _ in range(60):
        d.update(scores)
    assert set(d.sequences[0]) == {0, 2}
    expected = {0: math.log(0.25), 2: math.log(0.75)}
    assert d.logprobs[0] == pytest.approx([expected[t] for t in d.sequences[0]], abs=1e-6)


def test_beam_search_by_hand():
    """Two beams over four tokens (eos 3). Step 1 opens beams 0 and 1 from the first beam only;
    step 2 finishes [0, eos] (0.5 x 0.7) and keeps [1, 0] and [0, 1] running; step 3 finishes
    [1, 0, eos] and no running beam can beat the two finished ones any more."""
    d = BeamSearchDecoder(beams=2, max_new=10, eos=EOS)
    step = d.update(logprobs([0.5, 0.25, 0.15, 0.1], [0.5, 0.25, 0.15, 0.1]))
    assert step.tokens == [0, 1] and step.reorder.tolist() == [0, 0] and not step.done

    step = d.update(logprobs([0.05, 0.15, 0.1, 0.7], [0.7, 0.16, 0.1, 0.04]))
    assert d.sequences == [[1, 0], [0, 1]]
    assert step.tokens == [0, 1] and step.reorder.tolist() == [1, 0] and not step.done
    assert d.running_scores.tolist() == pytest.approx([math.log(0.25 * 0.7), math.log(0.5 * 0.15)], abs=1e-5)

    step = d.update(logprobs([0.1, 0.12, 0.08, 0.7], [0.05, 0.1, 0.15, 0.7]))
    assert step.done
    [result] = d.finalize([0.125, 0.5])
    assert result.tokens == [0, EOS]
    assert result.logprobs == pytest.approx([math.log(0.5), math.log(0.7)], abs=1e-5)
    # The hypothesis score: the sum of log-probabilities over the length (length_penalty 1).
    assert result.sum_logprob == pytest.approx(math.log(0.5 * 0.7) / 2, abs=1e-5)
    assert result.no_speech_prob == 0.125  # the first decoder row's


def test_beam_length_penalty_zero_prefers_the_likelier_longer_hypothesis():
    """The same search with length_penalty 0 scores hypotheses by their summed log-probability:
    [0, eos] (0.35) still beats [1, 0, eos] (0.1225); with penalty 1 it won by more."""
    d = BeamSearchDecoder(beams=2, max_new=10, eos=EOS, length_penalty=0.0)
    d.update(logprobs([0.5, 0.25, 0.15, 0.1], [0.5, 0.25, 0.15, 0.1]))
    d.update(logprobs([0.05, 0.15, 0.1, 0.7], [0.7, 0.16, 0.1, 0.04]))
    d.update(logprobs([0.1, 0.12, 0.08, 0.7], [0.05, 0.1, 0.15, 0.7]))
    assert d.fin_scores.tolist() == pytest.approx([math.log(0.35), math.log(0.25 * 0.7 * 0.7)], abs=1e-5)
    assert [seq for seq, _ in d.fin_seqs] == [[0, EOS], [1, 0, EOS]]


def test_beam_search_at_max_length_finishes_the_best_candidates():
    d = BeamSearchDecoder(beams=2, max_new=1, eos=EOS)
    step = d.update(logprobs([0.5, 0.25, 0.15, 0.1], [0.5, 0.25, 0.15, 0.1]))
    assert step.done
    [result] = d.finalize([0.0])
    assert result.tokens == [0]  # no eos: cut at the length limit
    assert result.sum_logprob == pytest.approx(math.log(0.5), abs=1e-5)

