"""RunInfo.batch_size reports the windows of one long input decoded together (it stayed 1
while the chunks of a long file ran batch_size at a time)."""
from __future__ import annotations

import numpy as np
import pytest

import wav2vec2_checkpoints as ck
from grpc_testing import load_model
from pipeserve.v1 import common_pb2, speech_recognition_pb2 as pb, speech_recognition_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def served(grpc_server, tmp_path_factory):
    directory, _ = ck.build("large", tmp_path_factory.mktemp("w2v-batch"))
    load_model(grpc_server, directory)
    return pb_grpc.SpeechRecognitionServiceStub(grpc_server.channel), str(directory)


def _request(model: str, audio: np.ndarray, **options) -> pb.TranscribeRequest:
    return pb.TranscribeRequest(model=model, audio=common_pb2.AudioInput(raw=common_pb2.RawAudio(
        samples=audio.astype("<f4").tobytes(), format=common_pb2.SAMPLE_FORMAT_FLOAT32_LE, sample_rate=16000,
        channels=1)), options=pb.TranscriptionOptions(**options))


@pytest.mark.parametrize("batch_size, expected", [(None, 1), (3, 3), (64, 8)])
def test_run_batch_size_counts_windows_decoded_together(served, batch_size, expected):
    stub, model = served
    # 1 s windows, 0.25 s strides, lengths aligned to the model's frames: 8 full windows and a
    # shorter last one (only windows of equal length batch together).
    audio = ck.audio(5.0, seed=2)
    options = dict(chunk_length_s=1.0, stride_length_s=0.25)
    if batch_size is not None:
        options["batch_size"] = batch_size
    response = stub.Transcribe(_request(model, audio, **options), timeout=120)
    streamed = list(stub.TranscribeStream(_request(model, audio, **options), timeout=120))
    assert response.run.batch_size == expected
    assert streamed[-1].done.run.batch_size == response.run.batch_size
    unchunked = stub.Transcribe(_request(model, audio), timeout=120)
    assert unchunked.run.batch_size == 1


def test_whisper_transcription_reports_windows_decoded_together(tmp_path):
    import torch

    import whisper_checkpoints as wc
    from harness import load_pipeline

    pipe = load_pipeline(wc.build(tmp_path / "en", multilingual=False))
    audio = torch.from_numpy(ck.audio(20.0, seed=4))  # 8 s windows, 5.33 s steps: 4 windows
    for batch_size, expected in ((None, 1), (2, 2), (8, 4)):
        options = {"chunk_length_s": 8, "max_new_tokens": 8}
        if batch_size:
            options["batch_size"] = batch_size
        assert pipe.transcribe([audio], options)[0].batch_size == expected
    assert pipe.transcribe([audio], {"max_new_tokens": 8})[0].batch_size == 1
