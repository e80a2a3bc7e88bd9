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


def _held_runtime_import(monkeypatch) -> threading.Event:
    """Holds the server's import of its torch-backed half (the runtime) until the returned
    event is set: the window a cold start spends importing, as long as the test needs."""
    from pipeserve import server as server_module

    release = threading.Event()
    original = server_module._import_runtime

    def held():
        release.wait(120)
        return original()

    monkeypatch.setattr(server_module, "_import_runtime", held)
    return release


def test_the_port_answers_health_while_the_runtime_is_still_importing(monkeypatch, vit_dir):
    """The port is bound and health answers NOT_SERVING before the runtime is imported; every
    other service answers UNAVAILABLE/STARTING (retryable), ModelService included; once the
    runtime is in and the default has loaded, everything serves."""
    from pipeserve import server as server_module
    from pipeserve.config import ModelSpec, Settings
    from pipeserve.v1 import image_classification_pb2_grpc, model_pb2, model_pb2_grpc
    from ops_testing import free_port

    release = _held_runtime_import(monkeypatch)
    address = f"127.0.0.1:{free_port()}"
    settings = Settings(listen=address, embedded_defaults=False,
                        preload={"image-classification": ModelSpec(model=str(vit_dir), task="image-classification")})
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    starting = asyncio.run_coroutine_threadsafe(server_module.start(settings, preload_defaults=True), loop)
    channel = grpc.insecure_channel(address)
    running = None
    try:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="")
        assert health.Check(request, timeout=60, wait_for_ready=True).status == Status.NOT_SERVING
        for service in (IMAGES, "pipeserve.v1.ModelService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status == Status.NOT_SERVING
        calls = [lambda: image_classification_pb2_grpc.ImageClassificationServiceStub(channel).ClassifyImage(
                     classify_request(""), timeout=30),
                 lambda: model_pb2_grpc.ModelServiceStub(channel).ListModels(model_pb2.ListModelsRequest(), timeout=30)]
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_reason(info.value) == "STARTING"
        assert not starting.done()  # still importing: the answers above came from the early stage

        release.set()
        running = starting.result(120)
        asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.shield(running.preloading), 120), loop).result(130)
        assert health.Check(request, timeout=30).status == Status.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service=IMAGES), timeout=30).status == Status.SERVING
        response = image_classification_pb2_grpc.ImageClassificationServiceStub(channel).ClassifyImage(
            classify_request(""), timeout=60)
        assert response.labels and response.run.model == str(vit_dir)
    finally:
        release.set()
        channel.close()
        running = running or starting.result(120)
        asyncio.run_coroutine_threadsafe(running.drain_and_stop(0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_defaults_load_concurrently_and_one_failing_leaves_the_others_serving(monkeypatch, vit_dir, tmp_path):
    """Preloads run side by side (the second starts before the first ends); a default that
    cannot load ends the start like one that loads, its task NOT_SERVING, the other SERVING."""
    from pipeserve.runtime.manager import ModelManager

    started: list[str] = []
    both_started = threading.Event()
    original = ModelManager.load

    async def load_once_both_started(self, name, *args, **kwargs):
        started.append(name)
        if len(started) == 2:
            both_started.set()
        while not both_started.is_set():  # a sequential preload would wait here for ever
            await asyncio.sleep(0.01)
        return await original(self, name, *args, **kwargs)

    monkeypatch.setattr(ModelManager, "load", load_once_both_started)
    server = _server(**{"image-classification": vit_dir, "feature-extraction": tmp_path / "missing"})
    try:
        server.call(asyncio.wait_for(asyncio.shield(server.running.preloading), 120))
        assert len(started) == 2
        assert _health(server, "") == Status.SERVING
        assert _health(server, IMAGES) == Status.SERVING
        assert _health(server, "pipeserve.v1.FeatureExtractionService") == Status.NOT_SERVING
    finally:
        both_started.set()
        server.stop()


def test_metrics_label_no_client_model_name_before_the_app_is_bound():
    """While a server imports its runtime, calls are refused but still counted: the model a
    caller named must not become a label (the manager that would vouch for it is not there)."""
    from pipeserve.serving.metrics import UNKNOWN_MODEL, Metrics

    metrics = Metrics()
    metrics.awaiting_app = True
    assert metrics.model_label("attacker-chosen-name-1") == UNKNOWN_MODEL


def test_a_runtime_that_fails_to_import_leaves_no_server_listening(monkeypatch):
    """The port answers before the runtime imports; if that import fails, start() raises and
    the port is closed again rather than left answering STARTING for ever."""
    import socket

    from pipeserve import server as server_module
    from pipeserve.config import Settings
    from ops_testing import free_port

    def broken():
        raise RuntimeError("a servicer module is broken")

    monkeypatch.setattr(server_module, "_import_servicers", broken)
    port = free_port()
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(RuntimeError, match="broken"):
            loop.run_until_complete(server_module.start(Settings(listen=f"127.0.0.1:{port}", embedded_defaults=False)))
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0
    finally:
        loop.close()


def test_a_task_whose_default_has_loaded_serves_while_another_default_still_loads(monkeypatch, vit_dir, tmp_path):
    """Defaults open one by one: a quick model does not wait for a slow one. The held task
    answers STARTING and is NOT_SERVING, the loaded one serves, the server ("") is
    NOT_SERVING until the last preload has ended."""
    from pipeserve.runtime.manager import ModelManager
    from pipeserve.v1 import image_classification_pb2_grpc

    release = threading.Event()
    original = ModelManager.load

    async def hold_features(self, name, *args, **kwargs):
        while kwargs.get("task") == "feature-extraction" and not release.is_set():
            await asyncio.sleep(0.01)
        return await original(self, name, *args, **kwargs)

    monkeypatch.setattr(ModelManager, "load", hold_features)
    features = "pipeserve.v1.FeatureExtractionService"
    server = _server(**{"image-classification": vit_dir, "feature-extraction": tmp_path / "slow"})
    try:
        _wait_for_health(server, IMAGES, Status.SERVING)
        response = image_classification_pb2_grpc.ImageClassificationServiceStub(server.channel).ClassifyImage(
            classify_request(""), timeout=60)
        assert response.labels
        assert _health(server, "") == Status.NOT_SERVING
        assert _health(server, features) == Status.NOT_SERVING
        from pipeserve.v1 import feature_extraction_pb2, feature_extraction_pb2_grpc

        with pytest.raises(grpc.RpcError) as info:
            feature_extraction_pb2_grpc.FeatureExtractionServiceStub(server.channel).ExtractFeatures(
                feature_extraction_pb2.ExtractFeaturesRequest(text="hello"), timeout=30)
        assert error_reason(info.value) == "STARTING"

        release.set()
        server.call(asyncio.wait_for(asyncio.shield(server.running.preloading), 120))
        assert _health(server, "") == Status.SERVING
    finally:
        release.set()
        server.stop()


def _wait_for_health(handle, service: str, status, timeout: float = 120.0) -> None:
    """Checks `service`'s health until it reports `status` (a load takes what it takes)."""
    import time

    deadline = time.monotonic() + timeout
    while _health(handle, service) != status:
        assert time.monotonic() < deadline, f"{service} never became {status}"
        time.sleep(0.02)


def test_defaults_load_one_at_a_time_under_a_memory_budget(monkeypatch, vit_dir, tmp_path):
    """A memory budget counts resident models: loads side by side would hold their transient
    copies at once, so under a budget the defaults load one after another."""
    from pipeserve.config import ModelSpec, Settings
    from pipeserve.runtime.manager import ModelManager

    running_now, most = [0], [0]
    original = ModelManager.load

    async def counting_load(self, *args, **kwargs):
        running_now[0] += 1
        most[0] = max(most[0], running_now[0])
        try:
            await asyncio.sleep(0.05)  # room for a concurrent load to start, if one would
            return await original(self, *args, **kwargs)
        finally:
            running_now[0] -= 1

    monkeypatch.setattr(ModelManager, "load", counting_load)
    settings = Settings(listen="127.0.0.1:0", embedded_defaults=False, memory_budget_bytes=1 << 30,
                        preload={"image-classification": ModelSpec(model=str(vit_dir), task="image-classification"),
                                 "feature-extraction": ModelSpec(model=str(tmp_path / "missing"),
                                                                 task="feature-extraction")})
    server = ServerHandle(settings, preload_defaults=True)
    try:
        server.call(asyncio.wait_for(asyncio.shield(server.running.preloading), 120))
        assert most[0] == 1
        assert _health(server, IMAGES) == Status.SERVING
    finally:
        server.stop()
