"""Whisper parity with transformers on tiny random checkpoints (English-only 80 mel,
multilingual 128 mel): features, logits (<= 1e-4), CTranslate2 loading, and pipeline outputs
(text, segment and word timestamps, chunked + batched, sequential long-form, prompts)."""
from __future__ import annotations

import pytest
import torch

import whisper_checkpoints as wc
from harness import PARITY_ATOL, assert_close, assert_close_in_precision, load_pipeline
from whisper_chunk_oracle import corrected  # transformers' chunking, timestamp restarts fixed

GEN = {"num_beams": 1, "max_new_tokens": 40}  # transformers' pipeline defaults to 5 beams, 256 tokens


@pytest.fixture(scope="module")
def en(tmp_path_factory):
    d = wc.build(tmp_path_factory.mktemp("whisper") / "en", multilingual=False)
    return d, load_pipeline(d), wc.hf_pipeline(d)


@pytest.fixture(scope="module")
def ml(tmp_path_factory):
    d = wc.build(tmp_path_factory.mktemp("whisper") / "ml", multilingual=True, n_mels=128, seed=1)
    return d, load_pipeline(d), wc.hf_pipeline(d)


def _ours(pipe, audio, **options):
    options.setdefault("max_new_tokens", GEN["max_new_tokens"])
    return pipe.transcribe([torch.from_numpy(audio)], options)[0]


def _chunks(result):
    # Chunks without text (transformers closes one when a window ends on a timestamp pair) are
    # not segments in pipeserve.
    return [(c["text"], tuple(c["timestamp"])) for c in result["chunks"] if c["text"].strip()]


def _segments(result):
    return [(s.text, (s.start_s, s.end_s)) for s in result.segments]


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_feature_extractor(n_mels):
    from transformers import WhisperFeatureExtractor

    from pipeserve.pipelines.whisper.features import log_mel_spectrogram

    fe = WhisperFeatureExtractor(feature_size=n_mels)
    a, b = wc.synthetic_audio(3.0, 0), wc.synthetic_audio(11.5, 1)
    ref = fe([a, b], sampling_rate=16000, return_tensors="pt").input_features
    padded = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(a), torch.from_numpy(b)], batch_first=True)
    assert_close(log_mel_spectrogram(padded, n_mels), ref)
    long = wc.synthetic_audio(42.0, 2)
    ref_long = fe(long, sampling_rate=16000, return_tensors="pt", padding="longest", truncation=False).input_features
    assert_close(log_mel_spectrogram(torch.from_numpy(long), n_mels, pad_to=None), ref_long[0])


@pytest.mark.parametrize("which", ["en", "ml"])
def test_logits_parity(which, request):
    from transformers import WhisperForConditionalGeneration

    d, ours, _ = request.getfixturevalue(which)
    reference = WhisperForConditionalGeneration.from_pretrained(d).eval()
    n_mels = reference.config.num_mel_bins
    features = torch.randn(2, n_mels, 3000)
    sot = reference.generation_config.decoder_start_token_id
    tokens = torch.tensor([[sot, 50360, 400, 500, 600, 11, 13], [sot, 1, 2, 3, 50364, 50400, 50257]])
    with torch.no_grad():
        ref = reference(input_features=features, decoder_input_ids=tokens).logits
        assert_close(ours.model(features, tokens), ref)
        # Incremental decoding through the KV cache gives the same logits.
        enc = ours.model.encoder(features)
        cache = ours.model.decoder.new_cache(enc, 16)
        steps = [ours.model.decoder(tokens[:, :3], cache)] + [ours.model.decoder(tokens[:, i:i + 1], cache) for i in range(3, 7)]
        assert_close(torch.cat(steps, 1), ref)


def test_ctranslate2_checkpoint_maps_onto_our_module(en, tmp_path):
    from transformers import WhisperForConditionalGeneration

    d, _, _ = en
    reference = WhisperForConditionalGeneration.from_pretrained(d).eval()
    ct2 = wc.write_ct2(reference.state_dict(), tmp_path / "ct2", heads=4, tokenizer_from=d,
                       extra_config={"alignment_heads": [[1, 0]], "suppress_ids": [1, 2], "suppress_ids_begin": [220, 50256]})
    # The tests' own CT2 reader (the real-weight oracle's) inverts the writer exactly.
    _, read_back = wc.read_ct2_whisper(ct2 / "model.bin")
    expected_state = {k: t for k, t in reference.state_dict().items() if k != "proj_out.weight"}
    assert read_back.keys() == expected_state.keys()
    for name, tensor in expected_state.items():
        assert torch.equal(read_back[name], tensor), name
    pipe = load_pipeline(ct2)
    features = torch.randn(1, 80, 3000)
    tokens = torch.tensor([[50257, 50363, 400, 500, 50256]])
    with torch.no_grad():
        assert_close(pipe.model(features, tokens), reference(input_features=features, decoder_input_ids=tokens).logits)
    assert pipe.settings.alignment_heads == ((1, 0),) and pipe.settings.suppress_tokens == (1, 2)
    # A float16 package: we load its float16 weights into our float32 model, so the oracle is
    # transformers in float32 on the same float16-rounded weights, to PARITY_ATOL (a loader
    # that misread float16 moves logits far more; the rounding alone must be visible too).
    half = wc.write_ct2(reference.state_dict(), tmp_path / "ct2_f16", heads=4, dtype=torch.float16, tokenizer_from=d)
    rounded = WhisperForConditionalGeneration.from_pretrained(d).eval()
    rounded.load_state_dict({k: v.half().float() for k, v in reference.state_dict().items()})
    with torch.no_grad():
        expected = rounded(input_features=features, decoder_input_ids=tokens).logits
        assert_close(load_pipeline(half).model(features, tokens), expected)
        assert (expected - reference(input_features=features, decoder_input_ids=tokens).logits).abs().max() > 10 * PARITY_ATOL
        # Loaded to run in float16: transformers in float16 on the same weights, within the
        # tolerance derived in harness.reduced_precision_tolerance.
        expected_low = rounded.half()(input_features=features.half(), decoder_input_ids=tokens).logits
        got = load_pipeline(half, dtype="float16").model(features.half(), tokens)
        assert_close_in_precision(got, expected_low, expected, torch.float16)


def test_embedded_tiny_en_layout():
    from pipeserve.checkpoints.ctranslate2 import read_whisper

    config, state = read_whisper(wc.embedded_dir() / "model.bin")
    assert (config.d_model, config.encoder_layers, config.decoder_layers, config.encoder_attention_heads) == (384, 4, 4, 6)
    assert config.vocab_size == 51864 and config.num_mel_bins == 80
    assert state["model.encoder.layers.0.self_attn.k_proj.weight"].shape == (384, 384)
    assert "model.encoder.layers.0.self_attn.k_proj.bias" not in state


@pytest.mark.parametrize("timestamps", [True, False])
def test_english_pipeline_parity(en, timestamps):
    _, ours, hf = en
    audio = wc.synthetic_audio(7.0, 3)
    ref = hf(audio.copy(), return_timestamps=timestamps, generate_kwargs=GEN)
    got = _ours(ours, audio, return_timestamps="segment" if timestamps else "none")
    assert got.text == ref["text"]
    if timestamps:
        # max_new_tokens cuts the window after a closed segment: the text after it has no start
        # timestamp, (None, None) in transformers. Its earliest start is where the one before ended.
        assert _segments(got) == _chunks(ref)
        assert [s.start_s for s in got.segments].count(None) == 1 and got.segments[-1].start_s is None
        assert got.segments[-1].earliest_start_s == got.segments[-2].end_s > 0
    assert got.language == "en"


def test_multilingual_detection_forcing_and_translate(ml):
    _, ours, hf = ml
    audio = wc.synthetic_audio(5.0, 4)
    ref = hf(audio.copy(), return_timestamps=True, generate_kwargs=GEN)
    got = _ours(ours, audio, return_timestamps="segment")
    assert (got.text, _segments(got)) == (ref["text"], _chunks(ref))
    assert got.language in got.language_probabilities
    # The probabilities are transformers' softmax over the language tokens' logits at the
    # position after <|startoftranscript|>, on the first window.
    model = hf.model
    features = hf.feature_extractor(audio.copy(), sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        logits = model(input_features=features, decoder_input_ids=torch.tensor(
            [[model.generation_config.decoder_start_token_id]])).logits[0, -1]
    lang_to_id = model.generation_config.lang_to_id
    probs = torch.softmax(logits[list(lang_to_id.values())], -1)
    expected = {token[2:-2]: p.item() for token, p in zip(lang_to_id, probs, strict=True)}
    assert got.language == max(expected, key=expected.get)
    assert got.language_probabilities, "no language probabilities reported"
    for code, probability in got.language_probabilities.items():
        assert probability == pytest.approx(expected[code], abs=1e-4), code
    top = sorted(expected, key=expected.get, reverse=True)[:len(got.language_probabilities)]
    assert set(got.language_probabilities) == set(top)
    ref = hf(audio.copy(), generate_kwargs={**GEN, "language": "fr", "task": "translate"})
    got = _ours(ours, audio, return_timestamps="none", language="French", task="SPEECH_TASK_TRANSLATE")
    assert got.text == ref["text"] and got.language == "fr"


def test_chunked_batched_parity(en):
    _, ours, hf = en
    audio = wc.synthetic_audio(26.0, 5)
    ref = corrected(hf)(audio.copy(), chunk_length_s=10, batch_size=3, return_timestamps=True, generate_kwargs=GEN)
    got = _ours(ours, audio, chunk_length_s=10, batch_size=3, return_timestamps="segment")
    assert got.text == ref["text"]
    assert _segments(got) == _chunks(ref)
    unbatched = _ours(ours, audio, chunk_length_s=10, batch_size=1, return_timestamps="segment")
    assert _segments(unbatched) == _segments(got)


def test_sequential_long_form_parity(en):
    _, ours, hf = en
    audio = wc.synthetic_audio(45.0, 6)
    ref = hf(audio.copy(), return_timestamps=True, generate_kwargs=GEN)
    got = _ours(ours, audio, return_timestamps="segment")
    assert got.text == ref["text"]
    assert _segments(got) == _chunks(ref)
    assert got.duration_s == pytest.approx(45.0)


def test_word_timestamps_parity(en):
    _, ours, hf = en
    audio = wc.synthetic_audio(6.0, 7)
    ref = hf(audio.copy(), return_timestamps="word", generate_kwargs=GEN)
    got = _ours(ours, audio, return_timestamps="word")
    words = [(w.text, (w.start_s, w.end_s)) for s in got.segments for w in s.words]
    assert words == _chunks(ref)


def test_initial_prompt_parity(en):
    _, ours, hf = en
    audio = wc.synthetic_audio(5.0, 8)
    prompt_ids = hf.tokenizer.get_prompt_ids("Glossary: pipeserve, Whisper.", return_tensors="pt")
    ref = hf(audio.copy(), return_timestamps=True, generate_kwargs={**GEN, "prompt_ids": prompt_ids})
    got = _ours(ours, audio, return_timestamps="segment", initial_prompt="Glossary: pipeserve, Whisper.")
    assert (got.text, _segments(got)) == (ref["text"], _chunks(ref))


@pytest.mark.parametrize("timestamps", [True, False])
def test_beam_search_parity(en, timestamps):
    _, ours, hf = en
    audio = wc.synthetic_audio(6.0, 9)
    ref = hf(audio.copy(), return_timestamps=timestamps, generate_kwargs={"num_beams": 3, "max_new_tokens": 30})
    got = _ours(ours, audio, return_timestamps="segment" if timestamps else "none", num_beams=3, max_new_tokens=30)
    assert got.text == ref["text"]
    if timestamps:
        assert _segments(got) == _chunks(ref)


def test_temperature_fallback_and_no_speech_skip(en):
    _, ours, _ = en
    audio = wc.synthetic_audio(4.0, 10)
    # A compression-ratio threshold every window fails: each fallback temperature is tried,
    # and the last one's result is kept (generate_with_fallback).
    got = _ours(ours, audio, temperature=0.0, temperature_fallback=[0.4, 0.8], compression_ratio_threshold=0.01)
    assert got.segments and {s.temperature for s in got.segments} == {0.8}
    greedy = _ours(ours, audio)
    assert {s.temperature for s in greedy.segments} == {0.0}
    # Below the log-prob threshold and above the no-speech threshold: the window is silence.
    skipped = _ours(ours, audio, logprob_threshold=0.0, no_speech_threshold=0.0)
    assert skipped.text == "" and skipped.segments == []


def test_chunked_word_timestamps_parity(en):
    _, ours, hf = en
    audio = wc.synthetic_audio(16.0, 11)
    ref = corrected(hf)(audio.copy(), chunk_length_s=8, return_timestamps="word", generate_kwargs=GEN)
    got = _ours(ours, audio, chunk_length_s=8, return_timestamps="word")
    words = [(w.text, (w.start_s, w.end_s)) for s in got.segments for w in s.words]
    assert got.text == ref["text"]
    assert [w for w, _ in words] == [w for w, _ in _chunks(ref)]
    # Random weights attend almost uniformly, so DTW meets near-ties that 1e-7 differences in
    # attention can flip: allow one timestamp step (0.02 s) here; unchunked words match exactly.
    for (_, (a, b)), (_, (c, d)) in zip(words, _chunks(ref), strict=True):
        assert abs(a - c) <= 0.021 and abs(b - d) <= 0.021

