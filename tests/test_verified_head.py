"""The verified head (verified_head.py): greedy decoding's projection screened in bfloat16
gives the float32 argmax, the float32 text maximum and timestamp logits, and log-softmax values
within float32 noise; real speech decodes to the same tokens as with the float32 projection."""
from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from pipeserve.layers import verified_head

weights_ok = torch.ones(1, 1)
pytestmark = pytest.mark.skipif(not verified_head.available(weights_ok),
                                reason="oneDNN has no native bfloat16 on this CPU: the head is not used")

VOCAB, DIM, TAIL = 6000, 96, 500  # the last TAIL rows play the timestamp tokens


def _weight(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(VOCAB, DIM, generator=g) * 0.05


def _hidden(rows: int, scale: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, DIM, generator=g) * scale


def _no_mask(scores: torch.Tensor) -> None:
    pass


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("scale", [1.0, 30.0, 300.0])  # flat to sharply peaked logits
def test_choices_and_log_probabilities_equal_float32(rows, scale):
    weight = _weight()
    head = verified_head.VerifiedHead(weight, VOCAB - TAIL, max_rescored=VOCAB)
    h = _hidden(rows, scale)
    exact = h @ weight.T
    got = head.scores(h, _no_mask, lambda x: x @ weight.T)
    assert torch.equal(got.argmax(-1), exact.argmax(-1))
    # float32 summation-order noise: relative to the largest logit of the row
    noise = 1e-6 * exact.abs().max().item() + 1e-6
    torch.testing.assert_close(got[:, VOCAB - TAIL:], exact[:, VOCAB - TAIL:], rtol=0, atol=noise)
    text_exact = exact[:, :VOCAB - TAIL]
    torch.testing.assert_close(got[:, :VOCAB - TAIL].amax(-1), text_exact.amax(-1), rtol=0, atol=noise)
    # Every text logit within the margin of the maximum is the float32 one.
    near = text_exact >= text_exact.amax(-1, keepdim=True) - verified_head.MARGIN
    torch.testing.assert_close(got[:, :VOCAB - TAIL][near], text_exact[near], rtol=0, atol=noise)
    chosen = exact.argmax(-1, keepdim=True)
    torch.testing.assert_close(F.log_softmax(got, -1).gather(-1, chosen),
                               F.log_softmax(exact, -1).gather(-1, chosen), rtol=0, atol=1e-4)


def test_masked_tokens_stay_masked_and_a_fully_masked_text_row_is_fine():
    weight = _weight()
    head = verified_head.VerifiedHead(weight, VOCAB - TAIL)
    h = _hidden(2, 30.0)
    exact = h @ weight.T
    best = exact[0, :VOCAB - TAIL].argmax().item()

    def mask(scores):
        scores[0, best] = -math.inf  # the float32 winner is suppressed: the runner-up must win
        scores[1, :VOCAB - TAIL] = -math.inf  # only "timestamps" remain

    got = head.scores(h, mask, lambda x: x @ weight.T)
    expected = exact.clone()
    mask(expected)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert got[0, best] == -math.inf and torch.isinf(got[1, :VOCAB - TAIL]).all()
    torch.testing.assert_close(got[1, VOCAB - TAIL:], exact[1, VOCAB - TAIL:], rtol=1e-5, atol=1e-5)


def test_too_many_candidates_take_the_float32_projection():
    weight = _weight()
    head = verified_head.VerifiedHead(weight, VOCAB - TAIL, max_rescored=10)
    h = _hidden(1, 0.1)  # nearly uniform: everything is within the margin
    calls = []

    def exact(x):
        calls.append(1)
        return x @ weight.T

    got = head.scores(h, _no_mask, exact)
    assert calls == [1]
    torch.testing.assert_close(got, h @ weight.T)


def test_the_bound_holds_for_weights_far_from_bfloat16():
    # Rows with a large dynamic range round badly to bfloat16; the choice must still be exact.
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(VOCAB, DIM, generator=g) * torch.logspace(-3, 1, DIM)[None, :]
    head = verified_head.VerifiedHead(weight, VOCAB - TAIL, max_rescored=VOCAB)
    for seed in range(20):
        h = _hidden(1, 5.0, seed=seed)
        exact = h @ weight.T
        got = head.scores(h, _no_mask, lambda x: x @ weight.T)
        assert got.argmax().item() == exact.argmax().item()
        assert got.max().item() == pytest.approx(exact.max().item(), rel=1e-6, abs=1e-5)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_real_speech_decodes_the_same_with_and_without_the_verified_head(tmp_path):
    import whisper_checkpoints as wc
    from harness import load_pipeline
    from pipeserve.inputs.audio import load_audio_input
    from pipeserve.checkpoints.embedded import embedded_model_dir

    pipe = load_pipeline(embedded_model_dir("automatic-speech-recognition"))
    if not verified_head.available(pipe.model.decoder.embed_tokens.weight):
        pytest.skip("no native bfloat16 oneDNN on this CPU")
    # Whisper no longer installs it by default (models/whisper.py "exact_head": it did not pay
    # for its 39 MiB there); installed here at the site the pipeline names, it must still
    # decode exactly as the float32 projection does.
    assert pipe.model.decoder.verified_head is None
    head = verified_head.VerifiedHead(pipe.model.decoder.embed_tokens.weight,
                                      pipe.settings.no_timestamps_token_id + 1)
    pipe.model.decoder.verified_head = head
    audio = load_audio_input(data=wc.speak(" ".join(wc.SENTENCES[:3]), tmp_path / "a.wav"))
    options = pipe.options({"logprob_threshold": -1.0,
                          "temperature_fallback": [0.2, 0.4]})
    verified = pipe.transcribe([audio], options)[0]
    assert head._calls > 0  # the greedy steps read it
    pipe.model.decoder.verified_head = None
    plain = pipe.transcribe([audio], options)[0]
    assert [s.tokens for s in verified.segments] == [s.tokens for s in plain.segments]
    assert [(s.start_s, s.end_s, s.temperature) for s in verified.segments] == \
        [(s.start_s, s.end_s, s.temperature) for s in plain.segments]
    for a, b in zip(verified.segments, plain.segments):
        assert a.avg_logprob == pytest.approx(b.avg_logprob, abs=1e-4)


def test_a_head_that_keeps_falling_back_mostly_skips_the_screen():
    weight = _weight()
    head = verified_head.VerifiedHead(weight, VOCAB - TAIL, max_rescored=10)
    flat = _hidden(1, 0.1)
    calls = []

    def exact(x):
        calls.append(1)
        return x @ weight.T

    for _ in range(64):
        torch.testing.assert_close(head.scores(flat, _no_mask, exact), flat @ weight.T)
    assert len(calls) == 64  # always the float32 answer
    assert head._fallback_rate > 0.5
    # peaked logits again: the next probe screens successfully and screening resumes
    head.max_rescored = VOCAB
    peaked = _hidden(1, 300.0)
    for _ in range(5 * head.PROBE_EVERY):  # each successful probe lowers the rate by a fifth
        head.scores(peaked, _no_mask, exact)
    assert head._fallback_rate <= 0.5
