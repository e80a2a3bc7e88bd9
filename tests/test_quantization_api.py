"""LoadModelRequest.quantization (issue #15 item 3): the weights' quantized form through the API,
end to end over a real channel. ModelInfo.quantization reports the form a model was loaded
with (the source's default resolved: float); a form the request contradicts (load_in_8bit
saying otherwise, float16 storage) is INVALID_ARGUMENT before anything loads; a form that cannot
run here fails the load with QUANTIZATION_UNAVAILABLE; the server keeps serving throughout."""
from __future__ import annotations

import shutil

import grpc
import pytest

from generation_checkpoints import build
from grpc_testing import error_reason, load_model


@pytest.fixture
def server(grpc_server):
    return grpc_server  # the session's shared server (conftest)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gemma3-quantization")
    build("gemma3", directory, special_tokens=True)
    return directory


def _stub(server):
    from pipeserve.v1 import model_pb2_grpc

    return model_pb2_grpc.ModelServiceStub(server.channel)


def _listed(server) -> list[str]:
    from pipeserve.v1 import model_pb2

    return [m.name for m in _stub(server).ListModels(model_pb2.ListModelsRequest(), timeout=30).models]


def _generate(server, name: str) -> str:
    from pipeserve.v1 import text_generation_pb2 as pb, text_generation_pb2_grpc as pb_grpc

    options = pb.GenerationOptions(max_new_tokens=8, min_new_tokens=8)
    response = pb_grpc.TextGenerationServiceStub(server.channel).Generate(
        pb.GenerateRequest(model=name, prompt="Hello there", options=options), timeout=120)
    return response.sequences[0].text


def test_the_form_loaded_is_reported_and_another_form_is_refused(server, gemma, tmp_path):
    from pipeserve.v1 import model_pb2

    default = load_model(server, gemma)  # nothing chosen: the source's default, float weights
    assert default.quantization == model_pb2.QUANTIZATION_NONE and not default.quantized_int8
    int8_copy = shutil.copytree(gemma, tmp_path / "int8")
    int8 = load_model(server, int8_copy, quantization=model_pb2.QUANTIZATION_INT8)
    assert int8.quantization == model_pb2.QUANTIZATION_INT8 and int8.quantized_int8
    assert int8.bytes < default.bytes
    assert _generate(server, str(int8_copy))  # it serves

    # The same model asked for in another form is refused rather than answered with this copy,
    # whichever of the two fields asks.
    for fields in ({"quantization": model_pb2.QUANTIZATION_NONE}, {"load_in_8bit": False},
                   {"quantization": model_pb2.QUANTIZATION_GROUPED}):
        with pytest.raises(grpc.RpcError) as caught:
            load_model(server, int8_copy, **fields)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, fields
        assert error_reason(caught.value) == "MODEL_LOADED_WITH_OTHER_OPTIONS"
        assert "int8 weights" in caught.value.details()
    # Asking for what it has, either way, is answered with it.
    assert load_model(server, int8_copy, load_in_8bit=True).quantization == model_pb2.QUANTIZATION_INT8
    assert load_model(server, gemma, quantization=model_pb2.QUANTIZATION_NONE).name == str(gemma)


@pytest.mark.parametrize("fields, reason, words", [
    ({"quantization": 3, "load_in_8bit": True}, "INVALID_QUANTIZATION", "quantization grouped and load_in_8bit true"),
    ({"quantization": 2, "load_in_8bit": False}, "INVALID_QUANTIZATION", "quantization int8 and load_in_8bit false"),
    ({"quantization": 1, "load_in_8bit": True}, "INVALID_QUANTIZATION", "quantization none and load_in_8bit true"),
    ({"quantization": 3, "weights_dtype": 2}, "INVALID_DTYPE", "weights_dtype float16 and quantization grouped"),
    ({"quantization": 2, "weights_dtype": 2}, "INVALID_DTYPE", "weights_dtype float16 and quantization int8"),
    ({"quantization": 99}, "INVALID_ENUM_VALUE", "quantization"),
])
def test_contradictory_forms_are_invalid_argument_before_loading(server, gemma, fields, reason, words):
    from pipeserve.v1 import model_pb2

    with pytest.raises(grpc.RpcError) as caught:
        _stub(server).LoadModel(model_pb2.LoadModelRequest(model=str(gemma) + "-never", **fields), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(caught.value) == reason
    assert words in caught.value.details()
    assert str(gemma) + "-never" not in _listed(server)


@pytest.mark.parametrize("fields, words", [
    ({"dtype": 3}, "computes in float32; this load asks for dtype bfloat16"),  # D_TYPE_BFLOAT16
    ({"device": "auto"}, "runs on the CPU; this load asks for device 'auto'"),
])
def test_grouped_where_it_cannot_run_fails_the_load_and_the_server_serves(server, gemma, tmp_path, fields, words):
    from pipeserve.v1 import model_pb2

    copy = shutil.copytree(gemma, tmp_path / "grouped")
    with pytest.raises(grpc.RpcError) as caught:
        load_model(server, copy, quantization=model_pb2.QUANTIZATION_GROUPED, **fields)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(caught.value) == "QUANTIZATION_UNAVAILABLE"
    assert words in caught.value.details()
    assert _generate(server, str(gemma))  # another model still serves


def test_a_preload_spec_names_a_known_form_that_its_load_in_8bit_does_not_contradict():
    from pipeserve.config import ConfigError, _parse_preload

    specs = _parse_preload({"text-generation": ({"model": "m", "quantization": "grouped"}, "config.toml")})
    assert specs["text-generation"].quantization == "grouped"
    with pytest.raises(ConfigError, match="quantization 'int4' is not one of none, int8, grouped"):
        _parse_preload({"text-generation": ({"model": "m", "quantization": "int4"}, "config.toml")})
    with pytest.raises(ConfigError, match="quantization grouped and load_in_8bit true contradict"):
        _parse_preload({"text-generation": ({"model": "m", "quantization": "grouped", "load_in_8bit": True},
                                            "config.toml")})


def test_the_python_client_and_cli_send_the_form():
    from pipeserve.v1 import model_pb2
    from pipeserve_client import _requests

    request = _requests.load_model("m", quantization="grouped")
    assert request.HasField("quantization") and request.quantization == model_pb2.QUANTIZATION_GROUPED
    assert not _requests.load_model("m").HasField("quantization")
    with pytest.raises(ValueError):
        _requests.load_model("m", quantization="int3")


def test_grouped_loads_reports_and_serves(server, gemma, tmp_path):
    from pipeserve.v1 import model_pb2

    copy = shutil.copytree(gemma, tmp_path / "grouped-serves")
    info = load_model(server, copy, quantization=model_pb2.QUANTIZATION_GROUPED)
    assert info.quantization == model_pb2.QUANTIZATION_GROUPED and not info.quantized_int8
    assert _generate(server, str(copy))
    with pytest.raises(grpc.RpcError) as caught:
        load_model(server, copy, load_in_8bit=False)  # float asked of the grouped copy
    assert error_reason(caught.value) == "MODEL_LOADED_WITH_OTHER_OPTIONS"
    assert "grouped weights" in caught.value.details()


def test_grouped_for_a_family_without_it_fails_the_load(server, tmp_path):
    from pipeserve.v1 import model_pb2

    gpt2 = tmp_path / "gpt2"
    build("gpt2", gpt2)
    with pytest.raises(grpc.RpcError) as caught:
        load_model(server, gpt2, quantization=model_pb2.QUANTIZATION_GROUPED)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(caught.value) == "QUANTIZATION_UNAVAILABLE"
