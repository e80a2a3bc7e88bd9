"""Cross-request batching for Whisper (issue 16, item 1): windows of concurrent calls share
decoding steps and encoder passes (pipelines/whisper/batch_scheduler.py, window_batch.py), and
each call gets exactly what it gets alone: tokens, timestamps (segment and word), fallback
temperatures, languages; log-probabilities within the verified head's documented tolerance.

"Alone" is the inline path (InlineRunner: the code every call ran before batching) on the
compute lane; the batched runs start together from threads, as a server's drivers do (batching
needs the lane, which servers install: scheduling/compute.py)."""
from __future__ import annotations

import shutil

import pytest
import torch

import whisper_checkpoints as wc
from harness import load_pipeline, run_together

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")

# The verified head's log-softmax sums a screened tail (layers/verified_head.py: <= 5e-5 on
# real speech); whether a step screens or falls back depends on the rows screened together.
LOGPROB_TOL = 2e-4


@pytest.fixture(scope="module", autouse=True)
def lane():
    from pipeserve.scheduling import compute

    return compute.install()  # process-wide, as every in-process server test leaves it


@pytest.fixture(scope="module")
def tiny_en():
    from pipeserve.checkpoints.embedded import embedded_model_dir

    return load_pipeline(embedded_model_dir("automatic-speech-recognition"))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from pipeserve.inputs.audio import load_audio_input

    d = tmp_path_factory.mktemp("clips")
    short = [load_audio_input(data=wc.speak(s, d / f"c{i}.wav")) for i, s in enumerate(wc.SENTENCES[:4])]
    pause = torch.zeros(8000)
    pieces = []
    for i, sentence in enumerate(wc.SENTENCES[4:12]):
        pieces += [load_audio_input(data=wc.speak(sentence, d / f"l{i}.wav")), pause]
    long = torch.cat(pieces)
    assert long.shape[0] > 30 * 16000  # sequential long-form: several windows, the seek loop
    return short, long


def _key(t):
    return [(s.id, s.text, s.start_s, s.end_s, tuple(s.tokens), s.temperature, s.is_final,
             tuple((w.text, w.start_s, w.end_s) for w in s.words)) for s in t.segments]


def _assert_same(alone, batched):
    assert batched.text == alone.text
    assert _key(batched) == _key(alone)
    assert batched.language == alone.language
    for a, b in zip(alone.segments, batched.segments):
        assert b.avg_logprob == pytest.approx(a.avg_logprob, abs=LOGPROB_TOL)
        assert b.no_speech_prob == pytest.approx(a.no_speech_prob, abs=1e-6)
        for wa, wb in zip(a.words, b.words):
            assert wb.probability == pytest.approx(wa.probability, abs=LOGPROB_TOL)


def _inline(pipe, fn):
    """`fn()` on the compute lane with the pipeline's scheduler off: each call alone, inline."""
    from pipeserve.scheduling import compute

    saved = pipe.scheduler.max_rows
    pipe.scheduler.max_rows = 1
    try:
        return compute.call(fn)
    finally:
        pipe.scheduler.max_rows = saved




def test_a_batched_step_equals_each_window_stepped_alone(tiny_en):
    """WhisperDecoder.hidden_step over windows at different positions (a 1-row window, a 2-row
    one) gives every row bitwise what `hidden` gives its window alone, step after step."""
    decoder = tiny_en.model.decoder
    torch.manual_seed(0)
    with torch.inference_mode():
        encoder_out = tiny_en.model.encoder(torch.randn(3, 80, 3000))
        prompts = [torch.tensor([[50257, 50362]]), torch.tensor([[50257, 50362, 50363]] * 2)]
        outs = [encoder_out[:1], encoder_out[1:]]
        alone = [decoder.new_cache(e, 16) for e in outs]
        together = [decoder.new_cache(e, 16) for e in outs]
        for p, a, t in zip(prompts, alone, together):
            decoder.hidden(p, a)
            decoder.hidden(p, t)
        for step in range(4):
            tokens = [[400 + step], [500 + step, 600 + step]]
            expected = torch.cat([decoder.hidden(torch.tensor(tok)[:, None], cache)[:, -1]
                                  for tok, cache in zip(tokens, alone)])
            got = decoder.hidden_step(torch.tensor(tokens[0] + tokens[1]), together)
            assert torch.equal(got, expected), step
        assert [c.length for c in together] == [6, 7]
        with pytest.raises(ValueError, match="tokens for"):
            decoder.hidden_step(torch.tensor([1, 2]), together)


def test_concurrent_transcriptions_equal_each_alone(tiny_en, clips):
    """Short clips and a >30 s sequential long-form file, with segment, word and no timestamps
    and beam search, decode together and get what each gets alone; the calls report the
    windows decoded together."""
    short, long = clips
    cases = [(short[0], {"return_timestamps": "segment"}), (short[1], {}),
             (short[2], {"return_timestamps": "word"}), (short[3], {"num_beams": 2, "return_timestamps": "segment"}),
             (long, {"return_timestamps": "segment"}), (short[0], {"return_timestamps": "word"})]
    alone = _inline(tiny_en, lambda: [tiny_en.transcribe([audio], o)[0] for audio, o in cases])
    assert all(t.batch_size == 1 for t in alone)
    batched = run_together([lambda a=audio, o=o: tiny_en.transcribe([a], o)[0] for audio, o in cases])
    for a, b in zip(alone, batched):
        _assert_same(a, b)
    assert max(t.batch_size for t in batched) > 1
    assert all(t.batch_size <= tiny_en.scheduler.max_rows for t in batched)
    # One call alone on the scheduler is the inline path exactly.
    _assert_same(alone[2], run_together([lambda: tiny_en.transcribe([short[2]], cases[2][1])[0]])[0])


def test_chunked_and_live_calls_batch_with_the_others(tiny_en, clips):
    """Chunked mode (its chunks one batch) and a live stream feed the same scheduler."""
    short, long = clips

    def live(audio):
        stream = tiny_en.open_stream({"interim_interval_s": 2.0})
        # Interim decodes every 2 s of audio whatever a decode costs (the interval otherwise
        # stretches to twice the measured cost, which a loaded machine makes differ run to run).
        stream.clock, stream.last_cost_s = (lambda: 0.0), 0.0
        out = []
        for k in range(0, audio.shape[0], 16000):
            out += stream.push(audio[k:k + 16000])
        tail, done = stream.finish()
        return [(s.id, s.text, s.start_s, s.end_s, s.is_final) for s in out + tail], done.text

    def chunked():
        return tiny_en.transcribe([long], {"chunk_length_s": 10, "batch_size": 4, "return_timestamps": "segment"})[0]

    calls = [chunked, lambda: live(short[1]), lambda: tiny_en.transcribe([short[2]], {})[0]]
    alone = _inline(tiny_en, lambda: [c() for c in calls])
    batched = run_together(calls)
    _assert_same(alone[0], batched[0])
    assert batched[1] == alone[1]
    _assert_same(alone[2], batched[2])
    assert batched[0].batch_size >= 4


def test_sampling_fallback_decisions_equal_alone(tiny_en, clips):
    """Temperature fallback (seeded sampling rows decode in the batch through the float32
    projection) takes the same decisions and samples the same tokens as alone."""
    from pipeserve.pipelines.whisper.decoding import DecodeOptions, InlineRunner, generate
    from pipeserve.pipelines.whisper.features import log_mel_spectrogram
    from pipeserve.scheduling import compute

    short, _ = clips
    pipe = tiny_en

    def run(audio, runner, seed):
        opts = DecodeOptions(return_timestamps=True, temperatures=(0.0, 0.4, 0.8), logprob_threshold=-0.25,
                             seed=seed)
        with torch.inference_mode():
            features = compute.call(log_mel_spectrogram, audio, pipe.n_mels)
            segs = [seg for _, window in generate(pipe.model, features[None], [features.shape[-1]], pipe.settings,
                                                  pipe.tok, opts, runner=runner or pipe.scheduler.session())
                    for seg in window]
        return [(tuple(s.tokens), s.temperature, s.start, s.end) for s in segs]

    alone = [compute.call(run, audio, InlineRunner(), seed) for seed, audio in enumerate(short)]
    assert any(t > 0 for segs in alone for _, t, _, _ in segs), "the threshold should force a fallback"
    batched = run_together([lambda a=audio, s=seed: run(a, None, s) for seed, audio in enumerate(short)])
    assert batched == alone


def test_languages_mix_on_a_multilingual_checkpoint(tmp_path_factory):
    """Different languages (given and detected) in one batch on a multilingual checkpoint."""
    directory = wc.build(tmp_path_factory.mktemp("multi") / "whisper", multilingual=True)
    pipe = load_pipeline(directory)
    audio = [torch.from_numpy(wc.synthetic_audio(4.0 + i, seed=i)) for i in range(4)]
    options = [{"language": "fr", "max_new_tokens": 12}, {"language": "de", "max_new_tokens": 12},
               {"max_new_tokens": 12}, {"language": "es", "task": "translate", "max_new_tokens": 12,
                                        "return_timestamps": "segment"}]
    alone = _inline(pipe, lambda: [pipe.transcribe([a], o)[0] for a, o in zip(audio, options)])
    batched = run_together([lambda a=a, o=o: pipe.transcribe([a], o)[0] for a, o in zip(audio, options)])
    for a, b in zip(alone, batched):
        _assert_same(a, b)
    assert [t.language for t in batched][:2] == ["fr", "de"]
