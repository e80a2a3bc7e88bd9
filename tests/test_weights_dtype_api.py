"""LoadModelRequest.weights_dtype (issue #16 item 3): the float16-storage mode through the
API, end to end over a real channel. A tiny random Whisper loads with float16 weights under
float32 compute, GetModel reports the storage and the smaller bytes, and it transcribes as the
same checkpoint loaded in float32; every value the loader cannot honour is INVALID_ARGUMENT /
INVALID_DTYPE before anything loads, and the server keeps serving."""
from __future__ import annotations

import shutil

import grpc
import numpy as np
import pytest

import whisper_checkpoints as wc
from grpc_testing import error_reason, load_model, make_server


@pytest.fixture(scope="module")
def server():
    handle = make_server()
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return wc.build(tmp_path_factory.mktemp("whisper"), multilingual=False)


def _transcribe(server, model: str, samples: np.ndarray) -> str:
    from pipeserve.v1 import common_pb2, speech_recognition_pb2 as pb, speech_recognition_pb2_grpc as pb_grpc

    audio = common_pb2.AudioInput(raw=common_pb2.RawAudio(
        samples=samples.astype("<f4").tobytes(), sample_rate=16000, channels=1,
        format=common_pb2.SAMPLE_FORMAT_FLOAT32_LE))
    stub = pb_grpc.SpeechRecognitionServiceStub(server.channel)
    return stub.Transcribe(pb.TranscribeRequest(model=model, audio=audio), timeout=300).transcription.text


def test_load_model_keeps_float16_weights_and_reports_them(server, checkpoint, tmp_path):
    from pipeserve.v1 import model_pb2

    twin = shutil.copytree(checkpoint, tmp_path / "float32-twin")  # the same weights, loaded as float32
    half = load_model(server, checkpoint, weights_dtype=model_pb2.D_TYPE_FLOAT16)
    full = load_model(server, twin)
    assert half.weights_dtype == model_pb2.D_TYPE_FLOAT16 and half.dtype == model_pb2.D_TYPE_FLOAT32
    assert full.weights_dtype == model_pb2.D_TYPE_UNSPECIFIED
    # No packed copy, and the float16 weights take about half the float32 model's bytes.
    assert half.memory.packed_bytes == 0 and half.bytes < 0.6 * full.bytes
    assert half.bytes == sum((half.memory.weights_bytes, half.memory.screening_bytes, half.memory.cache_bytes))

    samples = wc.synthetic_audio(3.0, seed=1)
    assert _transcribe(server, str(checkpoint), samples) == _transcribe(server, str(twin), samples)

    # The same model asked for in another storage is refused rather than answered with this copy.
    with pytest.raises(grpc.RpcError) as caught:
        load_model(server, checkpoint, weights_dtype=model_pb2.D_TYPE_FLOAT32)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(caught.value) == "MODEL_LOADED_WITH_OTHER_OPTIONS"
    assert "float16 weights" in caught.value.details()
    assert load_model(server, checkpoint, weights_dtype=model_pb2.D_TYPE_FLOAT16).name == str(checkpoint)


@pytest.mark.parametrize("fields, words", [
    ({"weights_dtype": 3}, "weights_dtype bfloat16 with dtype float32"),              # D_TYPE_BFLOAT16
    ({"weights_dtype": 2, "dtype": 3}, "weights_dtype float16 with dtype bfloat16"),
    ({"weights_dtype": 1, "dtype": 2}, "weights_dtype float32 with dtype float16"),   # wider than compute
    ({"weights_dtype": 2, "load_in_8bit": True}, "two ways to store the weights"),
])
def test_weights_dtype_values_the_loader_cannot_honour_are_invalid_argument(server, checkpoint, fields, words):
    from pipeserve.v1 import model_pb2, model_pb2_grpc

    stub = model_pb2_grpc.ModelServiceStub(server.channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.LoadModel(model_pb2.LoadModelRequest(model=str(checkpoint), **fields), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(caught.value) == "INVALID_DTYPE"
    assert words in caught.value.details()
    # Refused before loading: the model is not listed under the failed options, the server serves.
    names = [m.name for m in stub.ListModels(model_pb2.ListModelsRequest(), timeout=30).models]
    assert names.count(str(checkpoint)) <= 1


def test_an_unknown_weights_dtype_number_is_invalid_argument(server, checkpoint):
    from pipeserve.v1 import model_pb2, model_pb2_grpc

    stub = model_pb2_grpc.ModelServiceStub(server.channel)
    with pytest.raises(grpc.RpcError) as caught:  # proto3 keeps enum numbers it does not know
        stub.LoadModel(model_pb2.LoadModelRequest(model=str(checkpoint), weights_dtype=77), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(caught.value) == "INVALID_ENUM_VALUE" and "weights_dtype" in caught.value.details()


def test_weights_dtype_equal_to_dtype_is_the_ordinary_load(server, tmp_path):
    from pipeserve.v1 import model_pb2

    directory = wc.build(tmp_path / "plain", multilingual=False, seed=3)
    info = load_model(server, directory, weights_dtype=model_pb2.D_TYPE_FLOAT32)
    assert info.weights_dtype == model_pb2.D_TYPE_UNSPECIFIED and info.memory.packed_bytes > 0


def test_the_python_client_and_cli_send_weights_dtype(server, checkpoint):
    from pipeserve.v1 import model_pb2
    from pipeserve_client import Client
    from pipeserve_client._requests import load_model as build_load_model
    from pipeserve_client.cli import _dtype

    assert build_load_model("m", weights_dtype="float16").weights_dtype == model_pb2.D_TYPE_FLOAT16
    assert not build_load_model("m").HasField("weights_dtype")
    with Client(server.address) as client:  # already loaded with float16 weights: the same choice is accepted
        info = client.models.load(str(checkpoint), weights_dtype="float16", timeout=300)
    assert info.weights_dtype == model_pb2.D_TYPE_FLOAT16 and _dtype(info) == "float16/float32"
