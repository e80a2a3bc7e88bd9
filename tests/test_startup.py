"""Start-up: while the server loads its default models, task services answer
UNAVAILABLE/STARTING (retryable), not NOT_FOUND/NO_DEFAULT_MODEL, and health says NOT_SERVING;
ModelService, health and reflection answer; once the preload ends — loaded or failed — the
server serves normally."""
from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grpc_testing import ServerHandle, error_reason
from ops_testing import build_tiny_vit, classify_request

Status = health_pb2.HealthCheckResponse
IMAGES = "pipeserve.v1.ImageClassificationService"


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    return build_tiny_vit(tmp_path_factory.mktemp("startup") / "vit")


def _held_preload(monkeypatch) -> threading.Event:
    """Holds every ModelManager.load until the returned event is set: a preload as slow as
    the test needs, without timing."""
    from pipeserve.runtime.manager import ModelManager

    release = threading.Event()
    original = ModelManager.load

    async def held_load(self, *args, **kwargs):
        while not release.is_set():
            await asyncio.sleep(0.01)
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(ModelManager, "load", held_load)
    return release


def _server(**preload) -> ServerHandle:
    from pipeserve.config import ModelSpec, Settings

    settings = Settings(listen="127.0.0.1:0", embedded_defaults=False,
                        preload={task: ModelSpec(model=str(path), task=task) for task, path in preload.items()})
    return ServerHandle(settings, preload_defaults=True)


def _health(handle, service: str):
    return health_pb2_grpc.HealthStub(handle.channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=30).status


def test_task_calls_are_unavailable_until_the_defaults_have_loaded(monkeypatch, vit_dir):
    from pipeserve.v1 import image_classification_pb2_grpc, model_pb2, model_pb2_grpc

    release = _held_preload(monkeypatch)
    server = _server(**{"image-classification": vit_dir})
    try:
        images = image_classification_pb2_grpc.ImageClassificationServiceStub(server.channel)
        for model in ("", str(vit_dir)):
            with pytest.raises(grpc.RpcError) as info:
                images.ClassifyImage(classify_request(model), timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_reason(info.value) == "STARTING"
        assert _health(server, "") == Status.NOT_SERVING
        assert _health(server, IMAGES) == Status.NOT_SERVING
        assert _health(server, "pipeserve.v1.ModelService") == Status.SERVING
        model_pb2_grpc.ModelServiceStub(server.channel).ListModels(model_pb2.ListModelsRequest(), timeout=30)

        release.set()
        server.call(asyncio.wait_for(asyncio.shield(server.running.preloading), 120))
        assert _health(server, "") == Status.SERVING
        assert _health(server, IMAGES) == Status.SERVING
        response = images.ClassifyImage(classify_request(""), timeout=60)
        assert response.labels and response.run.model == str(vit_dir)
    finally:
        release.set()
        server.stop()


def test_a_failed_preload_ends_the_start_too(monkeypatch, tmp_path):
    """A default that cannot load ends the starting state like one that loads: the server is
    SERVING, the task service is not, and task calls no longer say STARTING."""
    from pipeserve.v1 import image_classification_pb2_grpc

    release = _held_preload(monkeypatch)
    server = _server(**{"image-classification": tmp_path / "missing"})
    try:
        assert _health(server, "") == Status.NOT_SERVING
        release.set()
        server.call(asyncio.wait_for(asyncio.shield(server.running.preloading), 120))
        assert _health(server, "") == Status.SERVING
        assert _health(server, IMAGES) == Status.NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            image_classification_pb2_grpc.ImageClassificationServiceStub(server.channel).ClassifyImage(
                classify_request(""), timeout=30)
        assert error_reason(info.value) != "STARTING"
        assert info.value.code() != grpc.StatusCode.UNAVAILABLE
    finally:
        release.set()
        server.stop()


def test_a_server_without_defaults_to_load_serves_at_once():
    server = _server()
    try:
        assert server.running.preloading is None
        assert _health(server, "") == Status.SERVING
    finally:
        server.stop()
