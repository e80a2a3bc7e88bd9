"""Whisper's window loop (pipelines/whisper/decoding.decode_window) on a stand-in decoder whose
next-token logits depend on the last token only (a table), so every step is known by hand: the
loop sizes and reorders the cache, filters each step's scores, stops when the token decoder is
done or should_stop says so, yields to the compute lane between steps, and reads greedy steps
through the verified head when the model has one."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeserve.pipelines.whisper import decoding
from pipeserve.pipelines.whisper.generation_settings import GenerationSettings
from pipeserve.pipelines.whisper.logit_filters import LogitFilters, SuppressTokens
from pipeserve.pipelines.whisper.token_decoders import BeamSearchDecoder, GreedyDecoder

V, SOT, EOS, NO_TIMESTAMPS = 6, 0, 5, 4
SETTINGS = GenerationSettings(decoder_start_token_id=SOT, eos_token_id=EOS, pad_token_id=EOS,
                              no_timestamps_token_id=NO_TIMESTAMPS, prev_sot_token_id=None)
# Row t: the logits after token t. Greedy from <|startoftranscript|>: 1, 2, eos.
TABLE = torch.tensor([
    [0.0, 4.0, 1.0, 0.5, 0.0, 0.0],
    [0.0, 0.0, 4.0, 2.0, 0.0, 1.0],
    [0.0, 0.0, 0.0, 1.0, 0.0, 4.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 4.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 4.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 4.0],
])


class _Cache:
    def __init__(self, max_len: int):
        self.max_len, self.length, self.reorders = max_len, 0, []

    def reorder(self, index: torch.Tensor) -> None:
        self.reorders.append(index.tolist())


class _TableDecoder(nn.Module):
    """The decoder's interface (new_cache, forward, hidden, proj_out, verified_head): the hidden
    state is the last token one-hot, the projection reads the table."""

    def __init__(self):
        super().__init__()
        self.proj_out = nn.Linear(V, V, bias=False)
        with torch.no_grad():
            self.proj_out.weight.copy_(TABLE.T)
        self.proj_out.weight.requires_grad_(False)  # decoding runs without autograd
        self.verified_head = None
        self.caches: list[_Cache] = []
        self.inputs: list[list[int]] = []

    def new_cache(self, encoder_out, max_len):
        self.caches.append(_Cache(max_len))
        return self.caches[-1]

    def hidden(self, tokens, cache, logits_at=None):
        assert cache.length + tokens.shape[1] <= cache.max_len
        cache.length += tokens.shape[1]
        self.inputs.append(tokens[:, -1].tolist())
        x = F.one_hot(tokens, V).float()
        return x if logits_at is None else x[:, logits_at]

    def forward(self, tokens, cache, logits_at=None):
        return self.proj_out(self.hidden(tokens, cache, logits_at))


@pytest.fixture
def model():
    return SimpleNamespace(decoder=_TableDecoder())


@pytest.fixture
def yields(monkeypatch):
    calls = []
    monkeypatch.setattr(decoding.compute, "yield_point", lambda: calls.append(1))
    return calls


def _prompt(rows: int = 1) -> torch.Tensor:
    return torch.full((rows, 1), SOT)


def test_greedy_window_decodes_the_table_and_yields_between_steps(model, yields):
    decoder = GreedyDecoder(rows=2, max_new=10, eos=EOS, pad=EOS)
    [a, b] = decoding.decode_window(model, torch.zeros(2, 1, 1), _prompt(2), 0, SETTINGS, LogitFilters([]), decoder)
    assert a.tokens == b.tokens == [1, 2, EOS]
    assert a.logprobs == pytest.approx([float(TABLE[t].log_softmax(-1)[n]) for t, n in [(0, 1), (1, 2), (2, EOS)]])
    assert a.no_speech_prob == pytest.approx(float(TABLE[SOT].softmax(-1)[NO_TIMESTAMPS - 1]))
    assert model.decoder.caches[0].max_len == 1 + 10  # prompt + max_new
    assert model.decoder.inputs == [[SOT, SOT], [1, 1], [2, 2]]  # no step after the last token
    assert len(yields) == 2


def test_filters_shape_every_step(model, yields):
    filters = LogitFilters([SuppressTokens(torch.tensor([2]))])
    decoder = GreedyDecoder(rows=1, max_new=10, eos=EOS, pad=EOS)
    [r] = decoding.decode_window(model, torch.zeros(1, 1, 1), _prompt(), 0, SETTINGS, filters, decoder)
    assert r.tokens == [1, 3, EOS]  # after 1 the best is 2, suppressed: 3


def test_should_stop_ends_the_window_after_the_current_step(model, yields):
    decoder = GreedyDecoder(rows=1, max_new=10, eos=EOS, pad=EOS)
    [r] = decoding.decode_window(model, torch.zeros(1, 1, 1), _prompt(), 0, SETTINGS, LogitFilters([]), decoder,
                                 should_stop=lambda: True)
    assert r.tokens == [1]
    assert model.decoder.inputs == [[SOT]] and not yields


def test_max_new_tokens_ends_the_window(model, yields):
    decoder = GreedyDecoder(rows=1, max_new=2, eos=EOS, pad=EOS)
    [r] = decoding.decode_window(model, torch.zeros(1, 1, 1), _prompt(), 0, SETTINGS, LogitFilters([]), decoder)
    assert r.tokens == [1, 2]
    assert model.decoder.caches[0].max_len == 3


def test_beam_search_reorders_the_cache_each_step(model, yields):
    decoder = BeamSearchDecoder(beams=2, max_new=10, eos=EOS)
    [r] = decoding.decode_window(model, torch.zeros(2, 1, 1), _prompt(2), 0, SETTINGS, LogitFilters([]), decoder)
    assert r.tokens == [1, 2, EOS]
    cache = model.decoder.caches[0]
    assert len(cache.reorders) == len(model.decoder.inputs) - 1 == len(yields)
    assert cache.reorders[0] == [0, 0]  # both beams continue from the first (the prompt)


class _RecordingHead:
    def __init__(self):
        self.calls = 0

    def scores(self, h, mask, exact):
        self.calls += 1
        logits = exact(h).float()
        mask(logits)
        return logits


def test_verified_head_reads_greedy_steps_after_the_first_only(model, yields):
    head = model.decoder.verified_head = _RecordingHead()
    decoder = GreedyDecoder(rows=1, max_new=10, eos=EOS, pad=EOS)
    [r] = decoding.decode_window(model, torch.zeros(1, 1, 1), _prompt(), 0, SETTINGS, LogitFilters([]), decoder)
    assert r.tokens == [1, 2, EOS] and head.calls == 2

    sampled = GreedyDecoder(rows=1, max_new=10, eos=EOS, pad=EOS, temperature=0.5, generator=torch.Generator())
    decoding.decode_window(model, torch.zeros(1, 1, 1), _prompt(), 0, SETTINGS, LogitFilters([]), sampled)
    beams = BeamSearchDecoder(beams=2, max_new=10, eos=EOS)
    decoding.decode_window(model, torch.zeros(2, 1, 1), _prompt(2), 0, SETTINGS, LogitFilters([]), beams)
    assert head.calls == 2  # sampling and beams read the float32 projection
