"""The server shell: reflection lists every contract, health per service, UNIMPLEMENTED for
tasks without an implementation, ModelService errors with specific statuses."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from grpc_testing import error_reason
from pipeserve.server import SERVICES


def test_reflection_lists_every_service(grpc_server):
    stub = reflection_pb2_grpc.ServerReflectionStub(grpc_server.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert set(SERVICES) <= names
    assert "grpc.health.v1.Health" in names


def test_health_tracks_process_and_tasks(grpc_server):
    stub = health_pb2_grpc.HealthStub(grpc_server.channel)
    assert stub.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
    assert stub.Check(health_pb2.HealthCheckRequest(service="pipeserve.v1.ModelService")).status == \
        health_pb2.HealthCheckResponse.SERVING


def test_unknown_model_is_not_found_and_server_keeps_serving(grpc_server, tmp_path):
    from pipeserve.v1 import model_pb2, model_pb2_grpc

    stub = model_pb2_grpc.ModelServiceStub(grpc_server.channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.LoadModel(model_pb2.LoadModelRequest(model=str(tmp_path / "missing")), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(info.value) == "MODEL_NOT_FOUND"
    assert "does not exist" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.LoadModel(model_pb2.LoadModelRequest(model=""), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        stub.GetModel(model_pb2.GetModelRequest(model="never-loaded"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert stub.ListModels(model_pb2.ListModelsRequest(), timeout=30) is not None


def test_hub_id_offline_says_what_it_tried(grpc_server, monkeypatch, tmp_path):
    from pipeserve.v1 import model_pb2, model_pb2_grpc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    stub = model_pb2_grpc.ModelServiceStub(grpc_server.channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.LoadModel(model_pb2.LoadModelRequest(model="someone/not-cached"), timeout=60)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "Hugging Face cache" in info.value.details()
    assert "offline" in info.value.details()


def test_broken_checkpoint_fails_load_but_server_keeps_serving(grpc_server, tmp_path):
    from pipeserve.v1 import model_pb2, model_pb2_grpc

    (tmp_path / "config.json").write_text('{"model_type": "vit", "architectures": ["ViTForImageClassification"]}')
    stub = model_pb2_grpc.ModelServiceStub(grpc_server.channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.LoadModel(model_pb2.LoadModelRequest(model=str(tmp_path)), timeout=60)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    listed = stub.GetModel(model_pb2.GetModelRequest(model=str(tmp_path)), timeout=30).model
    assert listed.state == model_pb2.MODEL_STATE_FAILED and listed.error
    health = health_pb2_grpc.HealthStub(grpc_server.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
    stub.UnloadModel(model_pb2.UnloadModelRequest(model=str(tmp_path)), timeout=30)


def test_task_without_implementation_is_unimplemented(monkeypatch):
    """A service whose servicer module is missing from a build answers UNIMPLEMENTED with a
    clear message, on unary and streaming methods, and is still listed by reflection."""
    from grpc_testing import make_server
    from pipeserve import server as server_module

    monkeypatch.setitem(server_module.SERVICES, "pipeserve.v1.TextGenerationService",
                        ("pipeserve.api.not_in_this_build", None))
    server = make_server()
    try:
        for method, streaming in (("Generate", False), ("GenerateStream", True)):
            path = f"/pipeserve.v1.TextGenerationService/{method}"
            make = server.channel.unary_stream if streaming else server.channel.unary_unary
            call = make(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as info:
                result = call(b"", timeout=10)
                if streaming:
                    list(result)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "TextGenerationService" in info.value.details() and "not implemented" in info.value.details()
            assert error_reason(info.value) == "TASK_NOT_IMPLEMENTED"
    finally:
        server.stop()

@pytest.mark.slow  # loads Gemma 3 270M from its GGUF file (~20-40 s on 2 shared cores)
def test_embedded_defaults_preload_under_friendly_names():
    """The serve command's defaults: packaged Whisper tiny.en, all-MiniLM-L6-v2 and Gemma 3
    270M, listed as embedded/..., SERVING in health, addressed by an empty model name."""
    from grpc_testing import make_server
    from pipeserve.checkpoints.embedded import embedded_models
    from pipeserve.layers import grid_native
    from pipeserve.server import preload
    from pipeserve.v1 import (feature_extraction_pb2, feature_extraction_pb2_grpc, model_pb2, model_pb2_grpc,
                              text_generation_pb2, text_generation_pb2_grpc)

    expected = embedded_models()
    assert set(expected) == {"automatic-speech-recognition", "feature-extraction", "text-generation"}, \
        "scripts/setup installs the embedded model packages"
    server = make_server(embedded_defaults=True)
    try:
        server.call(preload(server.running))
        models = model_pb2_grpc.ModelServiceStub(server.channel).ListModels(model_pb2.ListModelsRequest(), timeout=30)
        assert sorted((m.name, m.state, m.is_default) for m in models.models) == [
            ("embedded/all-MiniLM-L6-v2", model_pb2.MODEL_STATE_READY, True),
            ("embedded/gemma-3-270m", model_pb2.MODEL_STATE_READY, True),
            ("embedded/whisper-tiny.en", model_pb2.MODEL_STATE_READY, True),
        ]
        [gemma] = [m for m in models.models if m.name == "embedded/gemma-3-270m"]
        assert gemma.family == "gemma3_text" and not gemma.quantized_int8 and gemma.source_path.endswith(".gguf")
        # a Q4_K_M file: its own grids where the native kernels are built (scripts/setup builds them)
        assert gemma.quantization == (model_pb2.QUANTIZATION_GROUPED if grid_native.available()
                                      else model_pb2.QUANTIZATION_NONE)
        health = health_pb2_grpc.HealthStub(server.channel)
        for service in ("pipeserve.v1.SpeechRecognitionService", "pipeserve.v1.FeatureExtractionService",
                        "pipeserve.v1.TextGenerationService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
                health_pb2.HealthCheckResponse.SERVING
        embedding = feature_extraction_pb2_grpc.FeatureExtractionServiceStub(server.channel).ExtractFeatures(
            feature_extraction_pb2.ExtractFeaturesRequest(text="pipeserve serves pipelines"), timeout=60)
        assert embedding.dimensions == 384 and embedding.run.model == "embedded/all-MiniLM-L6-v2"
        generated = text_generation_pb2_grpc.TextGenerationServiceStub(server.channel).Generate(
            text_generation_pb2.GenerateRequest(prompt="The capital of France is",
                                                options=text_generation_pb2.GenerationOptions(max_new_tokens=8)),
            timeout=120)
        assert generated.run.model == "embedded/gemma-3-270m"
        assert generated.sequences[0].generated_tokens >= 1 and generated.sequences[0].text.strip()
    finally:
        server.stop()


def test_undecodable_request_is_invalid_argument_in_every_service(grpc_server):
    """A string field holding invalid UTF-8: INVALID_ARGUMENT / MALFORMED_REQUEST, not UNKNOWN."""
    # Field 1 (`model` in every request), wire type 2, 2 bytes that are not UTF-8.
    payload = b"\x0a\x02\xff\xfe"
    for method in ("/pipeserve.v1.ImageClassificationService/ClassifyImage",
                   "/pipeserve.v1.ModelService/GetModel",
                   "/pipeserve.v1.FillMaskService/FillMask"):
        call = grpc_server.channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as info:
            call(payload, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
        assert error_reason(info.value) == "MALFORMED_REQUEST"


def _watch(channel, service: str):
    """Starts a health Watch; returns (the call, a queue that receives each status it streams)."""
    import queue
    import threading

    statuses: queue.Queue = queue.Queue()
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service), timeout=120)

    def read():
        try:
            for response in call:
                statuses.put(response.status)
        except grpc.RpcError as exc:
            statuses.put(exc.code())

    threading.Thread(target=read, daemon=True).start()
    return call, statuses


def test_health_watch_streams_the_current_status_then_each_change(tmp_path):
    """grpc.health.v1 Watch: the first message is the current status, then one per change;
    an unknown service is SERVICE_UNKNOWN (not an error); a task service follows its models."""
    from grpc_testing import load_model, make_server
    from ops_testing import build_tiny_vit
    from pipeserve.v1 import model_pb2, model_pb2_grpc

    Status = health_pb2.HealthCheckResponse
    server = make_server()
    try:
        whole, whole_statuses = _watch(server.channel, "")
        assert whole_statuses.get(timeout=30) == Status.SERVING
        unknown, unknown_statuses = _watch(server.channel, "no.such.Service")
        assert unknown_statuses.get(timeout=30) == Status.SERVICE_UNKNOWN
        images, image_statuses = _watch(server.channel, "pipeserve.v1.ImageClassificationService")
        assert image_statuses.get(timeout=30) == Status.NOT_SERVING

        vit = build_tiny_vit(tmp_path / "vit")
        load_model(server, vit)
        assert image_statuses.get(timeout=60) == Status.SERVING
        model_pb2_grpc.ModelServiceStub(server.channel).UnloadModel(
            model_pb2.UnloadModelRequest(model=str(vit)), timeout=60)
        assert image_statuses.get(timeout=60) == Status.NOT_SERVING
        for call in (whole, unknown, images):
            call.cancel()
        assert whole_statuses.get(timeout=30) == grpc.StatusCode.CANCELLED  # nothing else was sent
    finally:
        server.stop()
