"""Size-like and numeric request fields are refused before they control any work or memory
(issue 12, items 1 and 6): a live-stream config's channel count once sized a buffer before it
was checked (2^31-1 channels got the server OOM-killed), and raw audio at 1 Hz turned 6.4 kB
into 1,600 s of audio. Each bad field gets INVALID_ARGUMENT naming the field by its path,
before the model is even looked up, so the server below holds no model at all."""
from __future__ import annotations

import math

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ops_testing import ServerProcess


def _peak_rss(pid: int) -> int:
    from pathlib import Path

    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.fixture(scope="module")
def server():
    process = ServerProcess()
    try:
        process.wait_serving()
        channel = grpc.insecure_channel(process.address)
        yield process, channel
        channel.close()
    finally:
        process.terminate()
        process.kill()


def _error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)
    assert status is not None, error.details()
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError(f"no ErrorInfo in {error.details()}")


def _live(channel, config, chunks=()):
    from pipeserve.v1 import speech_recognition_pb2 as pb, speech_recognition_pb2_grpc as pb_grpc

    def requests():
        yield pb.StreamingTranscribeRequest(config=config)
        for chunk in chunks:
            yield pb.StreamingTranscribeRequest(audio=pb.AudioChunk(samples=chunk))
    return list(pb_grpc.SpeechRecognitionServiceStub(channel).StreamingTranscribe(requests(), timeout=30))


def test_a_huge_live_channel_count_is_refused_before_any_buffer_is_sized(server):
    """2^26 channels: the old handler allocated 4 x 2^26 bytes (256 MiB) on the event loop
    before checking; the process's peak RSS now stays put. (2^31-1, the value that got the
    server killed, is only sent once the check is in place: see the next test.)"""
    from pipeserve.v1 import common_pb2, speech_recognition_pb2 as pb

    process, channel = server
    before = _peak_rss(process.pid)
    config = pb.StreamingConfig(format=common_pb2.SAMPLE_FORMAT_FLOAT32_LE, sample_rate=16000, channels=1 << 26)
    with pytest.raises(grpc.RpcError) as error:
        _live(channel, config)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _error_info(error.value).metadata["field"] == "config.channels"
    assert _peak_rss(process.pid) - before < 64 << 20, "the refused config still sized a buffer"


def test_the_channel_count_that_killed_the_server_is_refused(server):
    from pipeserve.v1 import common_pb2, speech_recognition_pb2 as pb

    process, channel = server
    before = _peak_rss(process.pid)
    for channels in ((1 << 31) - 1, 65, -1):
        config = pb.StreamingConfig(format=common_pb2.SAMPLE_FORMAT_INT16_LE, sample_rate=16000, channels=channels)
        with pytest.raises(grpc.RpcError) as error:
            _live(channel, config)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, channels
        info = _error_info(error.value)
        assert info.metadata["field"] == "config.channels" and info.metadata["max"] == "64", channels
    assert _peak_rss(process.pid) - before < 64 << 20
    assert process.process.poll() is None


@pytest.mark.parametrize("rate", [0, 1, 3999, 192_001, (1 << 31) - 1, -16000])
def test_raw_and_live_sample_rates_outside_4_to_192_khz_are_refused(server, rate):
    from pipeserve.v1 import common_pb2, speech_recognition_pb2 as pb, speech_recognition_pb2_grpc as pb_grpc

    _, channel = server
    stub = pb_grpc.SpeechRecognitionServiceStub(channel)
    raw = common_pb2.RawAudio(samples=b"\0" * 6400, format=common_pb2.SAMPLE_FORMAT_FLOAT32_LE, sample_rate=rate)
    with pytest.raises(grpc.RpcError) as error:
        stub.Transcribe(pb.TranscribeRequest(audio=common_pb2.AudioInput(raw=raw)), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    info = _error_info(error.value)
    assert info.metadata["field"] == "audio.raw.sample_rate" and info.reason == "INVALID_INPUT"
    assert "4000" in error.value.details() and "192000" in error.value.details()

    config = pb.StreamingConfig(format=common_pb2.SAMPLE_FORMAT_FLOAT32_LE, sample_rate=rate, channels=1)
    with pytest.raises(grpc.RpcError) as error:
        _live(channel, config, [b"\0" * 6400])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _error_info(error.value).metadata["field"] == "config.sample_rate"


def _cases():
    """(service method, request, the field its error must name)."""
    from pipeserve.v1 import (common_pb2, document_question_answering_pb2 as docqa, feature_extraction_pb2 as fe,
                              fill_mask_pb2 as fm, image_classification_pb2 as ic, question_answering_pb2 as qa,
                              speech_recognition_pb2 as sr, text_classification_pb2 as tc,
                              text_generation_pb2 as tg, token_classification_pb2 as tok,
                              zero_shot_classification_pb2 as zs)

    audio = common_pb2.AudioInput(raw=common_pb2.RawAudio(samples=b"\0" * 64, format=1, sample_rate=16000))
    asr = lambda **o: sr.TranscribeRequest(audio=audio, options=sr.TranscriptionOptions(**o))  # noqa: E731
    gen = lambda **o: tg.GenerateRequest(prompt="hi", options=tg.GenerationOptions(**o))  # noqa: E731
    image = common_pb2.ImageInput(data=b"\x89PNG")
    return [
        ("SpeechRecognitionService/Transcribe", asr(num_beams=(1 << 31) - 1), "options.num_beams"),
        ("SpeechRecognitionService/Transcribe", asr(batch_size=0), "options.batch_size"),
        ("SpeechRecognitionService/Transcribe", asr(max_new_tokens=-1), "options.max_new_tokens"),
        ("SpeechRecognitionService/Transcribe", asr(chunk_length_s=math.nan), "options.chunk_length_s"),
        ("SpeechRecognitionService/Transcribe", asr(stride_length_s=math.inf), "options.stride_length_s"),
        ("SpeechRecognitionService/Transcribe", asr(temperature=1e30), "options.temperature"),
        ("SpeechRecognitionService/Transcribe", asr(temperature_fallback=[0.2] * 1000),
         "options.temperature_fallback"),
        ("SpeechRecognitionService/Transcribe", asr(temperature_fallback=[0.2, math.nan]),
         "options.temperature_fallback[1]"),
        ("SpeechRecognitionService/Transcribe", asr(initial_prompt="x" * 100_000), "options.initial_prompt"),
        ("SpeechRecognitionService/TranscribeStream", sr.TranscribeStreamRequest(
            audio=audio, options=sr.TranscriptionOptions(no_speech_threshold=math.nan)),
         "options.no_speech_threshold"),
        ("TextGenerationService/Generate", gen(max_new_tokens=(1 << 31) - 1), "options.max_new_tokens"),
        ("TextGenerationService/Generate", gen(top_k=-1), "options.top_k"),
        ("TextGenerationService/Generate", gen(temperature=math.inf), "options.temperature"),
        ("TextGenerationService/Generate", gen(stop=["x"] * 10_000), "options.stop"),
        ("TextGenerationService/Generate", tg.GenerateRequest(prompt="x" * (2 << 20)), "prompt"),
        ("TextGenerationService/GenerateStream", tg.GenerateStreamRequest(
            prompt="hi", options=tg.GenerationOptions(num_return_sequences=1 << 30)), "options.num_return_sequences"),
        ("ImageClassificationService/ClassifyImage", ic.ClassifyImageRequest(image=image, top_k=(1 << 31) - 1),
         "top_k"),
        ("ZeroShotClassificationService/ClassifyZeroShot", zs.ClassifyZeroShotRequest(
            sequence="hi", candidate_labels=[str(i) for i in range(100_000)]), "candidate_labels"),
        ("ZeroShotClassificationService/ClassifyZeroShot", zs.ClassifyZeroShotRequest(
            sequence="hi", candidate_labels=["a", "b" * 100_000]), "candidate_labels[1]"),
        ("DocumentQuestionAnsweringService/AnswerDocumentQuestion", docqa.AnswerDocumentQuestionRequest(
            question="q", words=[docqa.DocumentWord(text="w", box=docqa.BoundingBox(x0=5000))]), "words[0].box.x0"),
        ("DocumentQuestionAnsweringService/AnswerDocumentQuestion", docqa.AnswerDocumentQuestionRequest(
            question="q", words=[docqa.DocumentWord(text="w")] * 20_000), "words"),
        ("DocumentQuestionAnsweringService/AnswerDocumentQuestion", docqa.AnswerDocumentQuestionRequest(
            question="q", image=image, max_seq_len=-5), "max_seq_len"),
        ("TextClassificationService/ClassifyText", tc.ClassifyTextRequest(text="x" * (2 << 20)), "text"),
        ("TokenClassificationService/ClassifyTokens", tok.ClassifyTokensRequest(text="hi", stride=-1), "stride"),
        ("QuestionAnsweringService/AnswerQuestion", qa.AnswerQuestionRequest(
            question="q", context="c", doc_stride=(1 << 31) - 1), "doc_stride"),
        ("FillMaskService/FillMask", fm.FillMaskRequest(text="[MASK]", top_k=0), "top_k"),
        ("FillMaskService/FillMask", fm.FillMaskRequest(text="[MASK]", targets=["a"] * 5000), "targets"),
        ("FeatureExtractionService/ExtractFeatures", fe.ExtractFeaturesRequest(text="x" * (2 << 20)), "text"),
    ]


CASES = _cases()


@pytest.mark.parametrize("method,request_message,field", CASES, ids=[c[2] + "@" + c[0].split("/")[1] for c in CASES])
def test_out_of_range_fields_are_invalid_argument_naming_the_field(server, method, request_message, field):
    """Checked before the model lookup: this server holds no model, yet the answer is about
    the field, not NOT_FOUND."""
    _, channel = server
    path = f"/pipeserve.v1.{method}"
    call = (channel.unary_stream if method.endswith("Stream") else channel.unary_unary)(
        path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as error:
        result = call(request_message, timeout=30)
        if method.endswith("Stream"):
            list(result)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    info = _error_info(error.value)
    assert info.metadata["field"] == field, (info, error.value.details())
    assert info.reason in {"INVALID_PARAMETER", "INPUT_TOO_LARGE", "INVALID_INPUT"}
    assert len(error.value.details()) < 500


def test_the_limits_table_bounds_what_it_names():
    """Unit check of the shared validator: a nested path, finite-number and open-bound rules."""
    from pipeserve.api import limits
    from pipeserve.errors import InvalidParameter
    from pipeserve.v1 import text_generation_pb2 as tg

    limits.check(tg.GenerateRequest(prompt="hi", options=tg.GenerationOptions(repetition_penalty=1.2, top_k=0)))
    with pytest.raises(InvalidParameter) as error:
        limits.check(tg.GenerateRequest(options=tg.GenerationOptions(repetition_penalty=0.0)))
    assert error.value.metadata["field"] == "options.repetition_penalty" and "(0, 100]" in error.value.message


def _encoded(samples, rate: int, fmt: str = "FLAC") -> bytes:
    import io

    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt)
    return buffer.getvalue()


def test_encoded_audio_that_decodes_to_far_more_than_its_bytes_is_refused_while_decoding(monkeypatch):
    """FLAC of digital silence: 2.8 kB -> 60 s (345 samples per byte). Past the floor (lowered
    here to 10 s so the test stays small) such a file is refused; real audio of the same
    length (noise: ~1 sample per byte) decodes."""
    import numpy as np

    from pipeserve.inputs import audio
    from pipeserve.errors import InputTooLarge

    monkeypatch.setattr(audio, "DECODED_SAMPLES_FLOOR", 16000 * 10)
    silence = _encoded(np.zeros(16000 * 60, "float32"), 16000)
    with pytest.raises(InputTooLarge) as error:
        audio.decode_audio(silence, max_seconds=3600)
    assert error.value.metadata["field"] == "audio.data" and len(silence) < 10_000
    noise = _encoded(np.random.default_rng(0).uniform(-0.5, 0.5, 16000 * 60).astype("float32"), 16000)
    wave, rate = audio.decode_audio(noise, max_seconds=3600)
    assert wave.shape == (1, 16000 * 60) and rate == 16000


def test_encoded_audio_below_4_khz_is_refused_before_decoding():
    import numpy as np

    from pipeserve.inputs import audio
    from pipeserve.errors import InvalidInput

    with pytest.raises(InvalidInput) as error:
        audio.decode_audio(_encoded(np.zeros(2000, "float32"), 1000, "WAV"))
    assert error.value.metadata["field"] == "audio.data" and "4000" in error.value.message


def test_zero_shot_tokenizes_a_long_sequence_once_not_once_per_label(tmp_path):
    """A 1 MB sequence with 32 labels took 81 s: each label re-tokenized the whole text. The
    premise is now tokenized once and cut after the words the model can see; the scores are
    those of the uncut computation."""
    pytest.importorskip("transformers")
    from harness import load_pipeline
    from zero_shot_docqa_checkpoints import build_encoder_nli

    from pipeserve.errors import InputTooLarge
    from pipeserve.pipelines import zero_shot_classification as zs

    pipe = load_pipeline(build_encoder_nli("bert", tmp_path / "nli"))
    sequence = "The election results were announced today, said the quick brown fox. " * 600  # ~42k chars
    request = zs.ZeroShotRequest(sequence, tuple(f"topic {i}" for i in range(8)))
    options = pipe.options({"truncation": True})

    seen: list[int] = []
    encode = pipe.tokenizer.encode

    def counting(texts, pairs=None, **kwargs):
        seen.append(sum(len(t) for t in texts))
        return encode(texts, pairs, **kwargs)

    pipe.tokenizer.encode = counting
    cut = pipe.classify([request], options)[0]
    assert sum(seen) < 2 * len(sequence), f"{sum(seen)} premise characters tokenized for a {len(sequence)}-character text"
    pipe.tokenizer.encode = encode
    original = zs._CUT_BEYOND_CHARS_PER_TOKEN
    try:
        zs._CUT_BEYOND_CHARS_PER_TOKEN = 1 << 30  # the uncut computation, for reference
        full = pipe.classify([request], options)[0]
    finally:
        zs._CUT_BEYOND_CHARS_PER_TOKEN = original
    assert [label for label, _ in cut.labels] == [label for label, _ in full.labels]
    assert all(abs(a - b) < 1e-6 for (_, a), (_, b) in zip(cut.labels, full.labels))
    with pytest.raises(InputTooLarge) as error:
        pipe.classify([request], pipe.options({"truncation": False}))
    assert error.value.metadata["field"] == "sequence"
