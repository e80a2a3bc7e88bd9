"""Whisper's logit filters: each small object enforces one rule on a window's scores before the
token decoder picks, and the decoding loop applies them as a list (openai-whisper's LogitFilter
shape).

Ports the logits processors that transformers' WhisperGenerationMixin.generate applies
(transformers/generation/logits_process.py): SuppressTokensAtBeginLogitsProcessor is
SuppressBlank, SuppressTokensLogitsProcessor is SuppressTokens, and
WhisperTimeStampLogitsProcessor is split into its three rules: ApplyTimestampRules (pairs and
order), InitialTimestamp (the first token is a timestamp, at most max_initial_timestamp_index)
and PreferTimestamps (the one rule that reads the scores).

Scores are float32 [rows, vocab] (raw logits for greedy and sampling, log-probabilities for beam
search), changed in place; `generated` holds each row's tokens so far in this window (all rows
have the same length: a finished greedy row keeps its tokens and is padded outside).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch


class LogitFilter:
    """One rule on the scores of one decoding step."""

    # False: the rule depends on the tokens so far only (a mask), so it may run on a screened
    # projection before its near-best entries are rescored exactly (layers/verified_head.py).
    # True: it reads the scores, and runs once they are exact, after every mask.
    reads_scores = False

    def apply(self, scores: torch.Tensor, generated: list[list[int]]) -> None:
        raise NotImplementedError


def token_index(tokens: Iterable[int], vocab: int, device) -> torch.Tensor:
    """The ids (below `vocab`) as a sorted index tensor: a scatter of ~100 ids costs far less per
    step than a vocabulary-sized mask."""
    return torch.tensor(sorted({t for t in tokens if t < vocab}), dtype=torch.long, device=device)


class SuppressBlank(LogitFilter):
    """The generation config's begin_suppress_tokens (the blank and <|endoftext|>) cannot be the
    window's first generated token."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def apply(self, scores: torch.Tensor, generated: list[list[int]]) -> None:
        if not generated[0]:
            scores[:, self.ids] = -math.inf


class SuppressTokens(LogitFilter):
    """The generation config's suppress_tokens are never generated."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def apply(self, scores: torch.Tensor, generated: list[list[int]]) -> None:
        scores[:, self.ids] = -math.inf


class ApplyTimestampRules(LogitFilter):
    """Timestamps come in pairs and never go back (WhisperTimeStampLogitsProcessor up to its
    log-softmax): no <|notimestamps|>; after a pair (or a lone first timestamp) text or a
    timestamp follows, after a single timestamp that closes text a timestamp or <|endoftext|>;
    a new timestamp is at least the last one (greater when the last one opened a segment)."""

    def __init__(self, no_timestamps: int, eos: int):
        self.no_timestamps, self.eos = no_timestamps, eos
        self.begin = no_timestamps + 1  # the first timestamp token, <|0.00|>

    def apply(self, scores: torch.Tensor, generated: list[list[int]]) -> None:
        tb = self.begin
        scores[:, self.no_timestamps] = -math.inf
        for k, seq in enumerate(generated):
            last_ts = len(seq) >= 1 and seq[-1] >= tb
            penultimate_ts = len(seq) < 2 or seq[-2] >= tb
            if last_ts:
                if penultimate_ts:
                    scores[k, tb:] = -math.inf
                else:
                    scores[k, :self.eos] = -math.inf
            limit = tb
            stamps = [t for t in seq if t >= tb]
            if stamps:
                limit = stamps[-1] if (last_ts and not penultimate_ts) else stamps[-1] + 1
            if limit > tb:
                scores[k, tb:limit] = -math.inf


class InitialTimestamp(LogitFilter):
    """The window's first generated token is a timestamp, at most <|max_index * 0.02|> when the
    generation config bounds it (max_initial_timestamp_index)."""

    def __init__(self, timestamp_begin: int, max_index: int | None):
        self.begin, self.max_index = timestamp_begin, max_index

    def apply(self, scores: torch.Tensor, generated: list[list[int]]) -> None:
        if generated[0]:
            return
        scores[:, :self.begin] = -math.inf
        if self.max_index is not None:
            scores[:, self.begin + self.max_index + 1:] = -math.inf


class PreferTimestamps(LogitFilter):
    """WhisperTimeStampLogitsProcessor's last rule: where the timestamps together are more likely
    than the best text token, only timestamps remain."""

    reads_scores = True

    def __init__(self, timestamp_begin: int):
        self.begin = timestamp_begin

    def apply(self, scores: torch.Tensor, generated: list[list[int]]) -> None:
        tb = self.begin
        # transformers compares log-probabilities; the log-softmax shifts both sides by the same
        # normaliser, so the raw scores decide the same (up to rounding) without a pass over the
        # vocabulary.
        ts_mass = scores[:, tb:].float().logsumexp(dim=-1)
        text_max = scores[:, :tb].amax(dim=-1)
        for k in (ts_mass > text_max).nonzero().flatten().tolist():
            scores[k, :tb] = -math.inf


class LogitFilters:
    """A window's filters in order, the masks before the rules that read the scores."""

    def __init__(self, filters: list[LogitFilter]):
        self.masks = [f for f in filters if not f.reads_scores]
        self.readers = [f for f in filters if f.reads_scores]

    def __call__(self, scores: torch.Tensor, generated: list[list[int]]) -> torch.Tensor:
        self.mask(scores, generated)
        return self.read(scores, generated)

    def mask(self, scores: torch.Tensor, generated: list[list[int]]) -> None:
        for f in self.masks:
            f.apply(scores, generated)

    def read(self, scores: torch.Tensor, generated: list[list[int]]) -> torch.Tensor:
        for f in self.readers:
            f.apply(scores, generated)
        return scores
