"""Whisper word probabilities, defined as openai-whisper's timing.find_alignment and
faster-whisper define them: in one teacher-forced pass over the decoded tokens, each text
token's probability under a softmax over the text vocabulary (ids below <|endoftext|>); a
word's probability is the mean over its tokens. The oracle recomputes that with transformers
on the same tiny random checkpoint and the tokens transformers itself decodes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import whisper_checkpoints as wc
from harness import load_pipeline

MAX_NEW = 40


@pytest.fixture(scope="module")
def en(tmp_path_factory):
    d = wc.build(tmp_path_factory.mktemp("whisper") / "en", multilingual=False)
    return load_pipeline(d), wc.hf_pipeline(d)


def _reference_words(hf, audio: np.ndarray) -> list[tuple[str, float]]:
    """(word, mean token probability) with transformers: its pipeline's words, and for each of
    its generate() tokens the softmax over the text vocabulary of the raw logits of the window
    that decoded it (output_logits: the teacher-forced pass of that window; one pass over the
    concatenated tokens would be wrong once decoding takes several windows, as it does here:
    generate() drops each window's tokens after its last timestamp pair and re-encodes)."""
    model, tok = hf.model, hf.tokenizer
    words = [c["text"] for c in hf(audio.copy(), return_timestamps="word",
                                   generate_kwargs={"num_beams": 1, "max_new_tokens": MAX_NEW})["chunks"]]
    inputs = hf.feature_extractor(audio, sampling_rate=16000, return_tensors="pt", return_attention_mask=True)
    with torch.no_grad():
        out = model.generate(inputs.input_features, attention_mask=inputs.attention_mask, return_timestamps=True,
                             num_beams=1, max_new_tokens=MAX_NEW, return_dict_in_generate=True,
                             return_segments=True, output_logits=True)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    text = []
    for segment in out["segments"][0]:
        sequence, logits = segment["result"]["sequences"].tolist(), segment["result"]["logits"]
        prompt = len(sequence) - len(logits)  # the window's decoder prompt, then one logit row per step
        begin, end = segment["idxs"]
        for position in range(begin, end):
            token = sequence[position]
            if token < eot:
                text.append((token, float(logits[position - prompt][:eot].float().softmax(-1)[token])))
    assert [t for t, _ in text] == [t for t in out["sequences"][0].tolist() if t < eot]
    out, k = [], 0
    for word in words:  # each word is the next run of text tokens that decodes to it
        run = []
        while tok.decode([t for t, _ in run]) != word:
            assert k < len(text), (word, words)
            run.append(text[k])
            k += 1
        out.append((word, float(np.mean([p for _, p in run]))))
    return out


def test_word_probability_is_mean_token_probability(en):
    ours, hf = en
    audio = wc.synthetic_audio(6.0, 7)
    expected = _reference_words(hf, audio)
    got = ours.transcribe([torch.from_numpy(audio)], {"return_timestamps": "word", "max_new_tokens": MAX_NEW})[0]
    words = [w for s in got.segments for w in s.words]
    assert [w.text for w in words] == [w for w, _ in expected]
    assert len(words) >= 3
    for word, (_, probability) in zip(words, expected):
        assert word.probability == pytest.approx(probability, abs=1e-4), word.text
        assert 0.0 < word.probability <= 1.0


def test_chunked_words_carry_probabilities(en):
    ours, _ = en
    audio = wc.synthetic_audio(20.0, 3)
    got = ours.transcribe([torch.from_numpy(audio)], {"return_timestamps": "word", "chunk_length_s": 8,
                                                      "batch_size": 2, "max_new_tokens": MAX_NEW})[0]
    words = [w for s in got.segments for w in s.words]
    assert words and all(0.0 < w.probability <= 1.0 for w in words)
