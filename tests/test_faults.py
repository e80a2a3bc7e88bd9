"""Faults, through real channels: clients that cancel (queued unary calls, token streams and
live transcriptions mid-flight), deadlines that expire (queued and mid-stream), a model that
fails to load, a model unloaded while requests wait for it, SIGTERM while calls and streams
are in flight (they finish within the grace period, new ones get UNAVAILABLE; a live
transcription keeps receiving audio until its client closes it), a client holding more
streams than its limit, and a replica that dies behind client-side round robin (three server
processes; the client's calls carry on through the others).

After each fault the server is checked to have let go: no call in flight, no queued item, no
active generation, and the next call works."""
from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
import urllib.request

import grpc
import pytest

from grpc_testing import error_reason, load_model, make_server
from ops_testing import ServerProcess, build_tiny_vit, classify_request, free_port

pytest.importorskip("transformers")


def _generation_available() -> bool:
    try:
        import pipeserve.api.text_generation  # noqa: F401
    except ImportError:
        return False
    return True


needs_generation = pytest.mark.skipif(not _generation_available(),
                                      reason="pipeserve.api.text_generation is not importable yet")


def _asr_available() -> bool:
    try:
        import pipeserve.api.speech_recognition  # noqa: F401
    except ImportError:
        return False
    return True


needs_asr = pytest.mark.skipif(not _asr_available(), reason="pipeserve.api.speech_recognition is not importable yet")


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    return build_tiny_vit(tmp_path_factory.mktemp("faults_vit"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random Llama with room for long generations (4096 positions), so that a stream
    is still producing tokens when the fault happens."""
    from generation_checkpoints import build

    directory = tmp_path_factory.mktemp("faults_llama")
    build("llama", directory, max_position_embeddings=4096)
    return directory


@pytest.fixture(scope="module")
def w2v_dir(tmp_path_factory):
    """A tiny random wav2vec2 CTC checkpoint for live (bidirectional) transcription."""
    import wav2vec2_checkpoints

    directory, _ = wav2vec2_checkpoints.build("large", tmp_path_factory.mktemp("faults_w2v"))
    return directory


def _live_requests(model: str, seconds: float, sent: list, stop: threading.Event | None = None):
    """Live audio: a config, then 100 ms int16 packets paced in real time (until `stop`)."""
    import numpy as np
    import wav2vec2_checkpoints
    from pipeserve.v1 import common_pb2, speech_recognition_pb2 as pb

    yield pb.StreamingTranscribeRequest(config=pb.StreamingConfig(
        model=model, options=pb.TranscriptionOptions(chunk_length_s=2.0), format=common_pb2.SAMPLE_FORMAT_INT16_LE,
        sample_rate=16000, channels=1, interim_interval_s=0.2))
    pcm = (np.clip(wav2vec2_checkpoints.audio(seconds, seed=3), -1, 1) * 32767).astype("<i2")
    for k in range(0, len(pcm), 1600):
        if stop is not None and stop.is_set():
            return
        time.sleep(0.1)
        sent.append(k)
        yield pb.StreamingTranscribeRequest(audio=pb.AudioChunk(samples=pcm[k:k + 1600].tobytes()))


@pytest.fixture(scope="module")
def server(vit_dir):
    handle = make_server(max_batch_size=16, metrics_listen="127.0.0.1:0")
    load_model(handle, vit_dir)
    yield handle
    handle.stop()


def _images(handle):
    from pipeserve.v1 import image_classification_pb2_grpc

    return image_classification_pb2_grpc.ImageClassificationServiceStub(handle.channel)


def _models(channel):
    from pipeserve.v1 import model_pb2_grpc

    return model_pb2_grpc.ModelServiceStub(channel)


def _eventually(condition, timeout=10.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} did not happen within {timeout}s")


@contextlib.contextmanager
def _slow_batches(handle, seconds: float = 3.0):
    """Calls wait this long for batch company: time enough to cancel, expire or unload them
    while they are queued, however loaded the machine is."""
    batcher = handle.running.app.batcher
    saved = batcher.max_wait_s, batcher.wait_when_idle
    batcher.max_wait_s, batcher.wait_when_idle = seconds, True
    try:
        yield
    finally:
        batcher.max_wait_s, batcher.wait_when_idle = saved


def _settled(handle, name: str) -> None:
    """Nothing of the faulted calls is left behind on the server."""
    _eventually(lambda: handle.manager.get(name).in_flight == 0, what=f"{name} idle")
    _eventually(lambda: handle.running.app.batcher.depth() == 0, what="batch queues empty")


def _codes(handle) -> dict[tuple[str, str], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{handle.running.metrics.port}/metrics", timeout=10).read()
    out: dict[tuple[str, str], float] = {}
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            if s.name == "pipeserve_requests_total":
                key = (s.labels["method"], s.labels["code"])
                out[key] = out.get(key, 0) + s.value
    return out


# ---- cancellation and deadlines ------------------------------------------------------------------
def test_cancelled_queued_calls_cost_nothing_and_the_next_call_works(server, vit_dir):
    name = str(vit_dir)
    images = _images(server)
    with _slow_batches(server):
        futures = [images.ClassifyImage.future(classify_request(name, seed=i), timeout=30) for i in range(4)]
        _eventually(lambda: server.running.app.batcher.depth() == 4, what="four calls queued")
        for future in futures[:3]:
            future.cancel()
        assert all(f.cancelled() for f in futures[:3])
        assert futures[3].result().labels  # the caller who stayed gets its answer
    _settled(server, name)
    assert server.running.app.batcher.depth() == 0
    codes = _codes(server)
    _eventually(lambda: _codes(server).get(("ClassifyImage", "CANCELLED"), 0) >= 3, what="3 CANCELLED counted")
    assert codes.get(("ClassifyImage", "OK"), 0) >= 1
    assert images.ClassifyImage(classify_request(name), timeout=30).labels


def test_expired_deadlines_get_deadline_exceeded_and_free_the_queue(server, vit_dir):
    name = str(vit_dir)
    images = _images(server)
    started = time.perf_counter()
    with _slow_batches(server), pytest.raises(grpc.RpcError) as expired:
        images.ClassifyImage(classify_request(name), timeout=0.3)
    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.perf_counter() - started < 5
    _settled(server, name)
    _eventually(lambda: _codes(server).get(("ClassifyImage", "DEADLINE_EXCEEDED"), 0) >= 1,
                what="DEADLINE_EXCEEDED counted")
    assert images.ClassifyImage(classify_request(name), timeout=30).labels


@needs_generation
def test_streams_cancelled_or_expired_mid_stream_stop_generating(server, llama_dir):
    from pipeserve.v1 import model_pb2, text_generation_pb2 as pb, text_generation_pb2_grpc

    name = str(llama_dir)
    load_model(server, llama_dir)
    stub = text_generation_pb2_grpc.TextGenerationServiceStub(server.channel)
    engine = server.manager.get(name).pipeline.engine
    request = pb.GenerateStreamRequest(model=name, prompt="Hello", options=pb.GenerationOptions(
        max_new_tokens=4000, ignore_eos=True))

    call = stub.GenerateStream(request, timeout=60)
    received = [next(call) for _ in range(3)]
    assert all(m.WhichOneof("event") == "token" for m in received)
    assert engine.active() == 1
    call.cancel()
    _eventually(lambda: engine.active() == 0 and engine.queued() == 0, what="generation stopped after cancel")

    call = stub.GenerateStream(request, timeout=1.0)
    got = 0
    with pytest.raises(grpc.RpcError) as expired:
        for message in call:
            got += message.WhichOneof("event") == "token"
    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0 < got < 4000
    _eventually(lambda: engine.active() == 0 and engine.queued() == 0, what="generation stopped after deadline")
    _settled(server, name)
    codes = _codes(server)
    assert codes.get(("GenerateStream", "CANCELLED"), 0) >= 1
    assert codes.get(("GenerateStream", "DEADLINE_EXCEEDED"), 0) >= 1
    short = list(stub.GenerateStream(pb.GenerateStreamRequest(model=name, prompt="Hi", options=pb.GenerationOptions(
        max_new_tokens=3, ignore_eos=True)), timeout=60))
    assert short[-1].WhichOneof("event") == "done" and short[-1].done.generated_tokens == 3
    _models(server.channel).UnloadModel(model_pb2.UnloadModelRequest(model=name), timeout=60)


@needs_asr
def test_live_transcription_cancelled_mid_stream_lets_go(server, w2v_dir):
    from pipeserve.v1 import model_pb2, speech_recognition_pb2_grpc

    name = str(w2v_dir)
    load_model(server, w2v_dir)
    stub = speech_recognition_pb2_grpc.SpeechRecognitionServiceStub(server.channel)
    sent: list = []
    stop = threading.Event()
    call = stub.StreamingTranscribe(_live_requests(name, 20.0, sent, stop), timeout=60)
    first = next(call)
    assert not first.HasField("done")
    assert server.manager.get(name).in_flight == 1
    call.cancel()
    stop.set()
    _settled(server, name)
    assert len(sent) < 100  # the client stopped long before its 20 s of audio
    _eventually(lambda: _codes(server).get(("StreamingTranscribe", "CANCELLED"), 0) >= 1, what="CANCELLED counted")
    done = list(stub.StreamingTranscribe(_live_requests(name, 1.0, []), timeout=60))[-1]
    assert done.HasField("done")
    _models(server.channel).UnloadModel(model_pb2.UnloadModelRequest(model=name), timeout=60)


@needs_asr
def test_sigterm_during_a_live_transcription_lets_it_finish(w2v_dir):
    from pipeserve.v1 import speech_recognition_pb2_grpc

    process = ServerProcess(*_preload_args(automatic_speech_recognition=w2v_dir), "--grace-period-s", "60")
    try:
        process.wait_serving("pipeserve.v1.SpeechRecognitionService")
        channel = grpc.insecure_channel(process.address)
        stub = speech_recognition_pb2_grpc.SpeechRecognitionServiceStub(channel)
        sent: list = []
        # 4 s of audio paced in real time: the client is still talking when SIGTERM arrives.
        call = stub.StreamingTranscribe(_live_requests("", 4.0, sent), timeout=120)
        assert not next(call).HasField("done")
        process.terminate()
        sent_at_sigterm = len(sent)
        responses = list(call)
        assert responses[-1].HasField("done")
        assert responses[-1].audio_received_s == pytest.approx(4.0)
        assert len(sent) > sent_at_sigterm  # audio kept flowing into the draining server
        assert process.process.wait(30) == 0
        channel.close()
    finally:
        process.kill()


@needs_generation
def test_one_client_cannot_hold_more_streams_than_its_limit(vit_dir, llama_dir):
    """Through a real channel and the real GenerateStream: the third concurrent stream of one
    client is refused with RESOURCE_EXHAUSTED / TOO_MANY_STREAMS; closing one frees its slot."""
    from pipeserve.v1 import text_generation_pb2 as pb, text_generation_pb2_grpc

    handle = make_server(max_streams_per_client=2)
    try:
        load_model(handle, llama_dir)
        stub = text_generation_pb2_grpc.TextGenerationServiceStub(handle.channel)
        request = pb.GenerateStreamRequest(prompt="Hi", options=pb.GenerationOptions(max_new_tokens=4000,
                                                                                     ignore_eos=True))
        first, second = stub.GenerateStream(request, timeout=60), stub.GenerateStream(request, timeout=60)
        assert next(first).WhichOneof("event") == "token" and next(second).WhichOneof("event") == "token"
        with pytest.raises(grpc.RpcError) as refused:
            next(stub.GenerateStream(request, timeout=60))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_reason(refused.value) == "TOO_MANY_STREAMS"
        first.cancel()
        _eventually(lambda: handle.running.security.streams_open("peer:127.0.0.1") == 1, what="slot freed")
        third = stub.GenerateStream(request, timeout=60)
        assert next(third).WhichOneof("event") == "token"
        second.cancel()
        third.cancel()
        _eventually(lambda: handle.running.security.streams_open("peer:127.0.0.1") == 0, what="all slots freed")
    finally:
        handle.stop()


# ---- model lifecycle faults -----------------------------------------------------------------------
def test_a_model_that_fails_to_load_is_reported_and_the_server_keeps_serving(server, vit_dir, tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from pipeserve.v1 import model_pb2

    broken = tmp_path / "broken_vit"
    shutil.copytree(vit_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage" + b"\x00" * 64)
    models = _models(server.channel)
    with pytest.raises(grpc.RpcError) as failed:
        models.LoadModel(model_pb2.LoadModelRequest(model=str(broken)), timeout=60)
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(failed.value) == "MODEL_LOAD_FAILED"
    assert str(broken) in failed.value.details()
    info = models.GetModel(model_pb2.GetModelRequest(model=str(broken)), timeout=10).model
    assert info.state == model_pb2.MODEL_STATE_FAILED and info.error
    # A task call naming it gets the same specific failure, not a hang or INTERNAL.
    with pytest.raises(grpc.RpcError) as named:
        _images(server).ClassifyImage(classify_request(str(broken)), timeout=30)
    assert named.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # Everything else keeps serving.
    assert _images(server).ClassifyImage(classify_request(str(vit_dir)), timeout=30).labels
    health = health_pb2_grpc.HealthStub(server.channel)
    for service in ("", "pipeserve.v1.ImageClassificationService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
    # Repaired files load on the next attempt.
    shutil.copy(vit_dir / "model.safetensors", broken / "model.safetensors")
    fixed = models.LoadModel(model_pb2.LoadModelRequest(model=str(broken)), timeout=60).model
    assert fixed.state == model_pb2.MODEL_STATE_READY
    models.UnloadModel(model_pb2.UnloadModelRequest(model=str(broken)), timeout=60)


def test_unloading_a_model_lets_waiting_requests_finish_and_turns_new_ones_away(server, vit_dir, tmp_path):
    from pipeserve.v1 import model_pb2

    copy = tmp_path / "vit_to_unload"
    shutil.copytree(vit_dir, copy)
    name = str(copy)
    load_model(server, copy)
    images, models = _images(server), _models(server.channel)
    with _slow_batches(server):
        waiting = [images.ClassifyImage.future(classify_request(name, seed=i), timeout=30) for i in range(4)]
        _eventually(lambda: server.running.app.batcher.depth() == 4, what="four calls queued")
        unloading = models.UnloadModel.future(model_pb2.UnloadModelRequest(model=name), timeout=30)
        _eventually(lambda: server.manager.get(name).state.value == "unloading", what="unloading")
        with pytest.raises(grpc.RpcError) as turned_away:
            images.ClassifyImage(classify_request(name), timeout=30)
    assert turned_away.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(turned_away.value) == "MODEL_NOT_READY"
    assert all(len(f.result().labels) == 5 for f in waiting)
    assert unloading.result().model.name == name
    listed = models.ListModels(model_pb2.ListModelsRequest(), timeout=10).models
    assert name not in {m.name for m in listed}
    assert images.ClassifyImage(classify_request(str(vit_dir)), timeout=30).labels


# ---- SIGTERM --------------------------------------------------------------------------------------
def _preload_args(**tasks) -> list[str]:
    args = []
    for task, path in tasks.items():
        args += ["--preload", f"{task.replace('_', '-')}={path}"]
    return args


def test_sigterm_lets_queued_calls_finish_and_refuses_new_ones(vit_dir):
    process = ServerProcess(*_preload_args(image_classification=vit_dir), "--max-batch-wait-ms", "1500",
                            "--max-batch-size", "16", "--grace-period-s", "20")
    try:
        process.wait_serving("pipeserve.v1.ImageClassificationService")
        channel = grpc.insecure_channel(process.address)
        from pipeserve.v1 import image_classification_pb2_grpc

        images = image_classification_pb2_grpc.ImageClassificationServiceStub(channel)
        in_flight = [images.ClassifyImage.future(classify_request(seed=i), timeout=30) for i in range(4)]
        time.sleep(0.4)  # queued for their batch, which waits 1.5 s
        process.terminate()
        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as refused:
            images.ClassifyImage(classify_request(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert all(len(f.result().labels) == 5 for f in in_flight)
        assert process.process.wait(30) == 0
        assert "stopped" in process.output()
        channel.close()
    finally:
        process.kill()


@needs_generation
def test_sigterm_during_streams_lets_them_finish(vit_dir, llama_dir):
    from pipeserve.v1 import text_generation_pb2 as pb, text_generation_pb2_grpc

    process = ServerProcess(*_preload_args(text_generation=llama_dir), "--grace-period-s", "120")
    try:
        process.wait_serving("pipeserve.v1.TextGenerationService")
        channel = grpc.insecure_channel(process.address)
        stub = text_generation_pb2_grpc.TextGenerationServiceStub(channel)
        # 3000 tokens each: seconds of work still ahead when SIGTERM arrives.
        request = pb.GenerateStreamRequest(prompt="Once", options=pb.GenerationOptions(
            max_new_tokens=3000, ignore_eos=True))
        streams = [stub.GenerateStream(request, timeout=180) for _ in range(3)]
        firsts = [next(s) for s in streams]  # every stream is generating
        assert all(m.WhichOneof("event") == "token" for m in firsts)
        process.terminate()
        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as refused:
            next(stub.GenerateStream(request, timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert process.process.poll() is None  # still draining the streams
        for stream in streams:
            rest = list(stream)
            assert rest[-1].WhichOneof("event") == "done"
            assert rest[-1].done.generated_tokens == 3000
            assert rest[-1].done.finish_reason == pb.FINISH_REASON_LENGTH
        assert process.process.wait(30) == 0
        channel.close()
    finally:
        process.kill()


# ---- a replica dies behind client-side round robin -----------------------------------------------
_SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": "pipeserve.v1.ImageClassificationService"}],
        "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.05s", "maxBackoff": "0.5s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
    }],
})


def _served(metrics_port: int) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "pipeserve_requests_total" and s.labels.get("method") == "ClassifyImage"
               and s.labels.get("code") == "OK")


def test_a_replica_dies_and_round_robin_with_retries_carries_on(vit_dir):
    from pipeserve.v1 import image_classification_pb2_grpc

    metrics_ports = [free_port() for _ in range(3)]
    replicas = [ServerProcess(*_preload_args(image_classification=vit_dir), "--metrics-listen",
                              f"127.0.0.1:{port}") for port in metrics_ports]
    try:
        for replica in replicas:
            replica.wait_serving("pipeserve.v1.ImageClassificationService", timeout=180)
        target = "ipv4:" + ",".join(r.address for r in replicas)
        channel = grpc.insecure_channel(target, options=[("grpc.service_config", _SERVICE_CONFIG),
                                                         ("grpc.enable_retries", 1)])
        images = image_classification_pb2_grpc.ImageClassificationServiceStub(channel)
        outcomes: list[str] = []
        stop = threading.Event()

        def client(seed: int) -> None:
            while not stop.is_set():
                try:
                    images.ClassifyImage(classify_request(seed=seed), timeout=20, wait_for_ready=True)
                    outcomes.append("OK")
                except grpc.RpcError as exc:
                    outcomes.append(exc.code().name)

        workers = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for w in workers:
            w.start()
        _eventually(lambda: len(outcomes) >= 30, timeout=60, what="30 calls")
        served_before = [_served(p) for p in metrics_ports]
        assert all(n > 0 for n in served_before), served_before  # round robin reached every replica
        victim = replicas[1]
        victim.process.kill()  # SIGKILL: no drain, connections just die
        victim.process.wait(10)
        killed_at = len(outcomes)
        _eventually(lambda: len(outcomes) >= killed_at + 60, timeout=90, what="60 calls after the kill")
        stop.set()
        for w in workers:
            w.join(30)
        assert set(outcomes) == {"OK"}, {c: outcomes.count(c) for c in set(outcomes)}
        survivors = [_served(p) for i, p in enumerate(metrics_ports) if i != 1]
        assert all(after > before for after, before in zip(survivors, [served_before[0], served_before[2]]))
        channel.close()
    finally:
        for replica in replicas:
            replica.kill()
