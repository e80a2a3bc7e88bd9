"""Whisper's logit filters one at a time (pipelines/whisper/logit_filters.py), on a vocabulary
small enough to check by hand: text tokens 0..4, <|endoftext|> 5, <|notimestamps|> 6 and the
timestamps <|0.00|>..<|0.08|> as 7..11."""
from __future__ import annotations

import math

import torch

from pipeserve.pipelines.whisper.logit_filters import (ApplyTimestampRules, InitialTimestamp, LogitFilter,
                                                        LogitFilters, PreferTimestamps, SuppressBlank,
                                                        SuppressTokens, token_index)

VOCAB, EOS, NO_TIMESTAMPS, TS = 12, 5, 6, 7


def allowed(scores: torch.Tensor) -> list[list[int]]:
    """Per row, the ids whose score is not -inf."""
    return [[i for i, v in enumerate(row.tolist()) if v != -math.inf] for row in scores]


def test_token_index_keeps_ids_inside_the_vocabulary_sorted_once():
    assert token_index([9, 3, 3, 40, 0], VOCAB, "cpu").tolist() == [0, 3, 9]
    assert token_index([], VOCAB, "cpu").numel() == 0


def test_suppress_blank_acts_on_the_first_generated_token_only():
    f = SuppressBlank(token_index([1, EOS], VOCAB, "cpu"))
    first = torch.zeros(2, VOCAB)
    f.apply(first, [[], []])
    assert allowed(first) == [[0, 2, 3, 4, 6, 7, 8, 9, 10, 11]] * 2
    later = torch.zeros(2, VOCAB)
    f.apply(later, [[3], [4]])
    assert allowed(later) == [list(range(VOCAB))] * 2


def test_suppress_tokens_acts_at_every_step():
    f = SuppressTokens(token_index([2, 4], VOCAB, "cpu"))
    for generated in ([[]], [[0, 1]]):
        scores = torch.zeros(1, VOCAB)
        f.apply(scores, generated)
        assert allowed(scores) == [[0, 1, 3, 5, 6, 7, 8, 9, 10, 11]]


def test_timestamp_rules_pair_and_order_the_timestamps():
    f = ApplyTimestampRules(NO_TIMESTAMPS, EOS)
    generated = [
        [],  # nothing yet: only <|notimestamps|> goes
        [7],  # a lone first timestamp opens a segment: text next
        [7, 2],  # text after <|0.00|>: the closing timestamp is later than it
        [7, 2, 9],  # a timestamp closing text: another (not earlier) or <|endoftext|>
        [7, 2, 9, 9],  # a closed pair: text next, no timestamp
    ]
    scores = torch.zeros(len(generated), VOCAB)
    f.apply(scores, generated)
    assert allowed(scores) == [
        [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11],
        [0, 1, 2, 3, 4, 5],
        [0, 1, 2, 3, 4, 5, 8, 9, 10, 11],
        [5, 9, 10, 11],
        [0, 1, 2, 3, 4, 5],
    ]


def test_initial_timestamp_bounds_the_first_token_only():
    scores = torch.zeros(1, VOCAB)
    InitialTimestamp(TS, max_index=2).apply(scores, [[]])
    assert allowed(scores) == [[7, 8, 9]]  # <|0.00|>..<|0.04|>
    unbounded = torch.zeros(1, VOCAB)
    InitialTimestamp(TS, max_index=None).apply(unbounded, [[]])
    assert allowed(unbounded) == [[7, 8, 9, 10, 11]]
    later = torch.zeros(1, VOCAB)
    InitialTimestamp(TS, max_index=2).apply(later, [[7]])
    assert allowed(later) == [list(range(VOCAB))]


def test_prefer_timestamps_drops_text_where_the_timestamps_together_are_likelier():
    scores = torch.zeros(2, VOCAB)
    # Row 0: five timestamps at 0 (mass log 5 = 1.61) beat the best text score 1.0.
    scores[0, 3] = 1.0
    # Row 1: the best text score 2.0 beats log 5.
    scores[1, 3] = 2.0
    before = scores.clone()
    f = PreferTimestamps(TS)
    assert f.reads_scores
    f.apply(scores, [[], []])
    assert allowed(scores) == [[7, 8, 9, 10, 11], list(range(VOCAB))]
    assert torch.equal(scores[:, TS:], before[:, TS:])
    assert torch.equal(scores[1], before[1])


class _Record(LogitFilter):
    def __init__(self, log: list[str], name: str, reads: bool):
        self.log, self.name, self.reads_scores = log, name, reads

    def apply(self, scores, generated):
        self.log.append(self.name)


def test_filters_run_masks_first_and_mask_alone_skips_the_score_readers():
    log: list[str] = []
    filters = LogitFilters([_Record(log, "reader", True), _Record(log, "a", False), _Record(log, "b", False)])
    scores = torch.zeros(1, VOCAB)
    assert filters(scores, [[]]) is scores
    assert log == ["a", "b", "reader"]
    log.clear()
    filters.mask(scores, [[]])
    assert log == ["a", "b"]
    log.clear()
    filters.read(scores, [[]])
    assert log == ["reader"]
