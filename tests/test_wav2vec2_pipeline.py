"""CTC speech recognition parity: text, char and word timestamps equal transformers.pipeline's
on tiny random wav2vec2 / HuBERT checkpoints, chunked and unchunked; CTC decoding equals
Wav2Vec2CTCTokenizer.decode; live streaming; bad input."""
from __future__ import annotations

import json
import random
import warnings

import pytest
import torch

import wav2vec2_checkpoints as ck
from harness import load_pipeline
from pipeserve.pipelines.ctc.decoding import CTCStreamDecoder, CTCVocabulary
from pipeserve.errors import InputTooLarge, InvalidInput, InvalidParameter, ModelLoadFailed
from pipeserve.checkpoints.hub import resolve
from pipeserve.pipelines.asr_types import Segment, Transcription

torch.set_num_threads(1)

CASES = [
    {},
    {"return_timestamps": "char"},
    {"return_timestamps": "word"},
    {"chunk_length_s": 2.0, "return_timestamps": "word"},
    {"chunk_length_s": 2.0, "stride_length_s": (0.5, 0.3), "return_timestamps": "char"},
    {"chunk_length_s": 1.5, "stride_length_s": 0.25, "return_timestamps": "word"},
]


@pytest.fixture(scope="module", params=["base", "large", "hubert"])
def pair(request, tmp_path_factory):
    """(variant, our pipeline, transformers' pipeline) on one tiny checkpoint."""
    from transformers import pipeline
    from transformers.utils import logging

    logging.set_verbosity_error()
    directory, _ = ck.build(request.param, tmp_path_factory.mktemp(request.param))
    reference = pipeline("automatic-speech-recognition", model=str(directory), device="cpu")
    return request.param, load_pipeline(directory), reference


def _as_reference(result: Transcription, level: str | None) -> dict:
    out = {"text": result.text}
    if level == "char":
        out["chunks"] = [{"text": c.text, "timestamp": (c.start_s, c.end_s)} for s in result.segments for c in s.chars]
    elif level == "word":
        out["chunks"] = [{"text": w.text, "timestamp": (w.start_s, w.end_s)} for s in result.segments for w in s.words]
    return out


def _reference(pipe, audio, **kwargs) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = pipe(audio.copy(), **kwargs)
    out = {"text": r["text"]}
    if "chunks" in r:
        out["chunks"] = [{"text": c["text"], "timestamp": tuple(float(t) for t in c["timestamp"])} for c in r["chunks"]]
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_matches_transformers_pipeline(pair, case):
    variant, ours, reference = pair
    audio = ck.audio(7.3, seed=1)
    expected = _reference(reference, audio, **case)
    got = ours.transcribe([torch.from_numpy(audio)], dict(case))[0]
    assert _as_reference(got, case.get("return_timestamps")) == expected
    assert got.text and " " in got.text  # random heads still make several words
    if "chunks" in expected:
        assert len(expected["chunks"]) > 3


def test_chunks_batched_equal_unbatched(pair):
    variant, ours, reference = pair
    audio = torch.from_numpy(ck.audio(9.1, seed=2))
    options = {"chunk_length_s": 1.5, "return_timestamps": "word"}
    one = ours.transcribe([audio], {**options, "batch_size": 1})[0]
    many = ours.transcribe([audio], {**options, "batch_size": 4})[0]
    assert _as_reference(many, "word") == _as_reference(one, "word")
    assert _as_reference(one, "word") == _reference(reference, audio.numpy(), **options)


def test_several_inputs_in_one_call(pair):
    variant, ours, reference = pair
    # unequal lengths (padded + masked for layer-norm models) and equal ones (stacked for all)
    audios = [ck.audio(s, seed=i) for i, s in enumerate((1.1, 2.7, 0.4, 1.1, 2.7))]
    results = ours.transcribe([torch.from_numpy(a) for a in audios], {"return_timestamps": "char"})
    assert [_as_reference(r, "char") for r in results] == [
        _reference(reference, a, return_timestamps="char") for a in audios]


def test_transcribe_stream_yields_segments_then_transcription(pair):
    variant, ours, _ = pair
    audio = torch.from_numpy(ck.audio(9.0, seed=3))
    events = list(ours.transcribe_stream(audio, {"chunk_length_s": 1.5, "return_timestamps": "word"}))
    *segments, done = events
    assert isinstance(done, Transcription) and all(isinstance(s, Segment) for s in segments)
    assert len(segments) >= 3 and all(s.is_final for s in segments)
    assert [s.id for s in segments] == [str(i) for i in range(len(segments))]
    assert "".join(s.text for s in segments).strip() == done.text
    starts = [s.start_s for s in segments]
    assert starts == sorted(starts) and segments[-1].end_s <= done.duration_s + 0.1
    assert done.duration_s == pytest.approx(9.0)
    assert all(0.0 < w.probability <= 1.0 for s in segments for w in s.words)


# -- live streaming ------------------------------------------------------------------------


def test_live_stream_finals_equal_offline_chunking(pair):
    variant, ours, _ = pair
    audio = torch.from_numpy(ck.audio(8.0, seed=4))
    options = {"chunk_length_s": 2.0, "return_timestamps": "word", "interim_interval_s": 0.25}
    stream = ours.open_stream(options)
    events: list[Segment] = []
    rng = random.Random(0)
    at = 0
    while at < audio.shape[0]:
        size = rng.randint(200, 6000)  # arbitrary packet sizes
        events += stream.push(audio[at:at + size])
        at += size
    finals, done = stream.finish()
    events += finals
    offline = ours.transcribe([audio], options)[0]
    assert done.text == offline.text
    assert _as_reference(done, "word") == _as_reference(offline, "word")
    assert [s for s in events if s.is_final] == done.segments
    interim = [s for s in events if not s.is_final]
    assert interim, "interim results appear between complete chunks"
    final_ids = {s.id for s in done.segments}
    # Every interim segment is replaced by the final segment of the same id, or by the last one.
    assert all(s.id in final_ids or int(s.id) == len(done.segments) for s in interim)
    assert stream.audio_received_s == pytest.approx(8.0)


def test_live_stream_interim_text_comes_quickly(pair):
    """Well before the first window is complete, interim text for the audio so far exists."""
    variant, ours, reference = pair
    stream = ours.open_stream({"interim_interval_s": 0.2})
    out = stream.push(torch.from_numpy(ck.audio(0.6, seed=5)))
    assert len(out) == 1 and not out[0].is_final and out[0].id == "0" and out[0].text
    _, done = stream.finish()
    with pytest.raises(InvalidInput):
        stream.push(torch.zeros(10))
    # the final result is the whole utterance's transcript, as transformers reads it
    assert done.text == _reference(reference, ck.audio(0.6, seed=5))["text"]


def test_live_stream_bad_audio(pair):
    variant, ours, _ = pair
    stream = ours.open_stream({})
    with pytest.raises(InvalidInput, match="NaN"):
        stream.push(torch.tensor([0.0, float("nan")]))
    segments, done = ours.open_stream({}).finish()  # nothing sent: an empty transcription
    assert segments == [] and done.text == "" and done.duration_s == 0.0


# -- CTC decoding ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import Wav2Vec2CTCTokenizer

    out = []
    for lower in (False, True):
        directory = tmp_path_factory.mktemp(f"tok{lower}")
        (directory / "vocab.json").write_text(json.dumps(ck.VOCAB))
        tokenizer = Wav2Vec2CTCTokenizer(str(directory / "vocab.json"), do_lower_case=lower)
        tokenizer.save_pretrained(directory)
        out.append((tokenizer, CTCVocabulary.from_files(resolve(str(directory)))))
    return out


def test_ctc_decode_equals_tokenizer(tokenizers):
    rng = random.Random(0)
    for tokenizer, vocab in tokenizers:
        for trial in range(200):
            n = rng.randint(0, 60)
            # Mostly blanks, delimiters and a few letters (so repeats and runs happen), some unknown ids.
            ids = [rng.choice([0, 0, 0, 4, 4, 5, 6, 7, 1, 31, rng.randint(0, 40)]) for _ in range(n)]
            expected = tokenizer.decode(ids, output_char_offsets=True, output_word_offsets=True)
            got = vocab.decode(ids, offsets=True)
            assert got.text == expected.text
            assert [(c.char, c.start_offset, c.end_offset) for c in got.char_offsets] == [
                (c["char"], int(c["start_offset"]), int(c["end_offset"])) for c in expected.char_offsets]
            assert [(w.word, w.start_offset, w.end_offset) for w in got.word_offsets] == [
                (w["word"], int(w["start_offset"]), int(w["end_offset"])) for w in expected.word_offsets]
            stream = CTCStreamDecoder(vocab)
            for k in range(0, n, 7):
                stream.push(ids[k:k + 7])
            assert stream.text() == got.text
            assert [c for c, _, _ in stream.chars()] == got.char_offsets


def test_missing_vocabulary_is_a_load_error(tmp_path):
    directory, _ = ck.build("base", tmp_path)
    (directory / "vocab.json").unlink()
    with pytest.raises(ModelLoadFailed, match="vocab.json"):
        load_pipeline(directory)


# -- bad input and options ---------------------------------------------------------------


def test_bad_input(pair):
    variant, ours, reference = pair
    with pytest.raises(InvalidInput, match="no samples"):
        ours.transcribe([torch.zeros(0)], {})
    with pytest.raises(InvalidInput, match="NaN or infinite"):
        ours.transcribe([torch.tensor([0.1, float("inf"), 0.2] * 100)], {})
    with pytest.raises(InvalidInput, match="mono"):
        ours.transcribe([torch.zeros(2, 1600)], {})
    tiny = ours.transcribe([torch.full((10,), 0.1)], {"return_timestamps": "word"})[0]  # < one frame
    assert tiny.text == "" and tiny.segments == [] and tiny.duration_s == pytest.approx(10 / 16000)
    # silence (zero variance: normalisation must not divide by zero) and noise read as transformers reads them
    silent = ours.transcribe([torch.zeros(16000)], {"return_timestamps": "char"})[0]
    assert _as_reference(silent, "char") == _reference(reference, torch.zeros(16000).numpy(), return_timestamps="char")
    noise = torch.randn(16000, generator=torch.Generator().manual_seed(0))
    noisy = ours.transcribe([noise], {})[0]
    assert noisy.text == _reference(reference, noise.numpy())["text"]


def test_huge_input(pair, monkeypatch):
    variant, ours, _ = pair
    monkeypatch.setattr(ours, "max_audio_s", 5.0)
    with pytest.raises(InputTooLarge):
        ours.transcribe([torch.zeros(6 * 16000)], {})
    stream = ours.open_stream({})
    stream.push(torch.zeros(4 * 16000))
    with pytest.raises(InputTooLarge):
        stream.push(torch.zeros(2 * 16000))


def test_long_audio_without_chunk_length_is_chunked(pair, monkeypatch):
    variant, ours, reference = pair
    monkeypatch.setattr(ours, "max_unchunked_s", 3.0)
    monkeypatch.setattr(ours, "auto_chunk_s", 2.0)
    audio = ck.audio(6.5, seed=8)
    got = ours.transcribe([torch.from_numpy(audio)], {"return_timestamps": "word"})[0]
    assert _as_reference(got, "word") == _reference(reference, audio, chunk_length_s=2.0, return_timestamps="word")


@pytest.mark.parametrize("options, field", [
    ({"return_timestamps": "sentence"}, "return_timestamps"),
    ({"chunk_length_s": -1.0}, "chunk_length_s"),
    ({"chunk_length_s": float("nan")}, "chunk_length_s"),
    ({"chunk_length_s": 1.0, "stride_length_s": 0.6}, "stride_length_s"),
    ({"chunk_length_s": 1.0, "stride_length_s": 0.5}, "chunk_length_s"),
    ({"stride_length_s": (1.0, 2.0, 3.0)}, "stride_length_s"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 1000}, "batch_size"),
    ({"num_beams": 4}, "num_beams"),
    ({"task": "translate"}, "task"),
    ({"temperature": 0.7}, "temperature"),
    ({"interim_interval_s": 0.0}, "interim_interval_s"),
])
def test_bad_options(pair, options, field):
    variant, ours, _ = pair
    with pytest.raises(InvalidParameter) as info:
        ours.transcribe([torch.from_numpy(ck.audio(3.0))], options)
    assert info.value.metadata.get("field") == field


def test_should_stop_ends_decoding(pair):
    """Cancellation / deadline: no more chunks are decoded once should_stop says so."""
    variant, ours, _ = pair
    calls = []

    def stop_after_two():
        calls.append(1)
        return len(calls) > 2

    audio = torch.from_numpy(ck.audio(9.0, seed=9))
    events = list(ours.transcribe_stream(audio, {"chunk_length_s": 1.5}, should_stop=stop_after_two))
    full = ours.transcribe([audio], {"chunk_length_s": 1.5})[0]
    assert isinstance(events[-1], Transcription)
    assert len(events[-1].text) < len(full.text)


def test_do_normalize_false_and_preprocessor_config_file(tmp_path):
    """A checkpoint whose feature extractor does not normalise, saved the Hub way
    (preprocessor_config.json beside the tokenizer files)."""
    from transformers import pipeline

    directory, _ = ck.build("large", tmp_path)
    processor = json.loads((directory / "processor_config.json").read_text())
    (directory / "processor_config.json").unlink()
    (directory / "preprocessor_config.json").write_text(json.dumps({**processor["feature_extractor"],
                                                                     "do_normalize": False}))
    ours = load_pipeline(directory)
    assert ours.do_normalize is False
    reference = pipeline("automatic-speech-recognition", model=str(directory), device="cpu")
    audio = ck.audio(3.0, seed=21) * 3.0  # not unit variance, so normalising would matter
    expected = _reference(reference, audio, return_timestamps="char")
    assert _as_reference(ours.transcribe([torch.from_numpy(audio)], {"return_timestamps": "char"})[0], "char") == expected


def test_live_stream_memory_stays_bounded(pair):
    """An hour-long stream must not keep every frame: audio beyond the current window and
    CTC runs already reported are dropped."""
    variant, ours, _ = pair
    stream = ours.open_stream({"chunk_length_s": 2.0, "interim_interval_s": 5.0})
    audio = torch.from_numpy(ck.audio(30.0, seed=22))
    for k in range(0, audio.shape[0], 8000):
        stream.push(audio[k:k + 8000])
        assert stream.buffer.shape[0] <= stream.chunk_len + 8000
    frames_per_chunk = stream.chunk_len // ours.align_to
    assert len(stream.segmenter.segments) > 5
    assert len(stream.segmenter.decoder.groups) < 3 * frames_per_chunk
    _, done = stream.finish()
    assert done.text == ours.transcribe([audio], {"chunk_length_s": 2.0})[0].text
