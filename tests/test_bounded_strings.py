"""User strings are bounded before they reach errors, logs and metric labels: a 100 kB model
name or request id gets a status with its ErrorInfo reason (never a trailer too large for the
client, RESOURCE_EXHAUSTED without a reason), adds a few kB at most to the server's log, and
never becomes a /metrics label."""
from __future__ import annotations

import urllib.request

import grpc
import pytest

from grpc_testing import error_reason
from ops_testing import ServerProcess, classify_request, free_port

HUGE = 100_000


@pytest.fixture(scope="module")
def server():
    metrics_port = free_port()
    process = ServerProcess("--metrics-listen", f"127.0.0.1:{metrics_port}")
    process.metrics_port = metrics_port
    try:
        process.wait_serving(timeout=120)
        yield process
    finally:
        process.kill()


def _huge_name(prefix: str) -> str:
    return f"/models/{prefix}-" + "n" * HUGE


def _assert_reasoned(error: grpc.RpcError) -> None:
    assert error_reason(error), (error.code(), error.details()[:200])
    assert len(error.details()) <= 2048


def test_huge_model_name_gets_a_reason_and_stays_out_of_logs_and_metrics(server):
    from pipeserve.v1 import image_classification_pb2_grpc, model_pb2, model_pb2_grpc

    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 1 << 20)])
    try:
        images = image_classification_pb2_grpc.ImageClassificationServiceStub(channel)
        models = model_pb2_grpc.ModelServiceStub(channel)
        log_before = len(server.output().encode())
        # Distinct names: the task call may leave a (failed) entry under its name.
        with pytest.raises(grpc.RpcError) as info:
            images.ClassifyImage(classify_request(_huge_name("task")), timeout=60)
        _assert_reasoned(info.value)
        with pytest.raises(grpc.RpcError) as info:
            models.GetModel(model_pb2.GetModelRequest(model=_huge_name("get")), timeout=60)
        _assert_reasoned(info.value)
        with pytest.raises(grpc.RpcError) as info:
            models.UnloadModel(model_pb2.UnloadModelRequest(model=_huge_name("unload")), timeout=60)
        _assert_reasoned(info.value)
        with pytest.raises(grpc.RpcError) as info:
            models.LoadModel(model_pb2.LoadModelRequest(model=_huge_name("load")), timeout=60)
        _assert_reasoned(info.value)
        assert models.ListModels(model_pb2.ListModelsRequest(), timeout=30) is not None
        grown = len(server.output().encode()) - log_before
        assert grown < 8_000, grown
        page = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
        assert "n" * 200 not in page
    finally:
        channel.close()


@pytest.mark.parametrize("rid", ["r" * HUGE, "r" * 129, "line\nbreak", "nul\x00byte", "esc\x1b[31m"])
def test_request_id_too_long_or_with_control_characters_is_invalid(server, rid):
    from pipeserve.v1 import image_classification_pb2_grpc

    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 1 << 20)])
    try:
        log_before = len(server.output().encode())
        with pytest.raises(grpc.RpcError) as info:
            image_classification_pb2_grpc.ImageClassificationServiceStub(channel).ClassifyImage(
                classify_request(request_id=rid), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_reason(info.value) == "INVALID_REQUEST_ID"
        assert len(server.output().encode()) - log_before < 4_000
    finally:
        channel.close()


def test_request_id_from_metadata_is_checked_too(server):
    from pipeserve.v1 import image_classification_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            image_classification_pb2_grpc.ImageClassificationServiceStub(channel).ClassifyImage(
                classify_request(), metadata=(("x-request-id", "m" * 500),), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(info.value) == "INVALID_REQUEST_ID"


def test_a_normal_request_id_is_echoed_in_errors_too(server):
    """Ids up to the bound, with the characters ids are made of, are accepted."""
    from pipeserve.v1 import image_classification_pb2_grpc

    rid = "req-" + "0123456789abcdef" * 7 + "_.:/=+"
    assert len(rid) <= 128
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            image_classification_pb2_grpc.ImageClassificationServiceStub(channel).ClassifyImage(
                classify_request(request_id=rid), timeout=60)
    # No model is loaded: the call fails for that reason, not for its id.
    assert error_reason(info.value) not in ("", "INVALID_REQUEST_ID")


def test_error_status_fits_the_trailer_whatever_the_message_and_metadata_hold():
    """The safety net under every raiser: message and ErrorInfo metadata are bounded in UTF-8
    bytes (non-ASCII text is percent-encoded in grpc-message, up to 12 bytes a character)."""
    from pipeserve.bounds import MAX_ERROR_MESSAGE_BYTES
    from pipeserve.errors import ModelNotFound, to_rpc_status

    error = ModelNotFound("no model named " + "é" * HUGE,
                          metadata={f"key{i}": "ü" * HUGE for i in range(50)})
    error.message = "query 3: " + error.message + "€" * HUGE  # a pipeline prefixing it later
    status = to_rpc_status(error)
    assert len(status.message.encode()) <= MAX_ERROR_MESSAGE_BYTES
    assert status.message.startswith("query 3: no model named éé") and "chars)" in status.message
    assert status.ByteSize() < 3_000
    percent_encoded = sum(1 if 0x20 <= b < 0x7f and b != 0x25 else 3 for b in status.message.encode())
    assert percent_encoded + status.ByteSize() * 4 // 3 < 8_192  # grpc's default trailer limit


def test_log_formatters_bound_messages_fields_and_tracebacks():
    import io
    import json
    import logging

    from pipeserve.serving.logs import configure_logging

    for fmt in ("text", "json"):
        stream = io.StringIO()
        handler = configure_logging(fmt, logging.INFO, stream)
        try:
            log = logging.getLogger("pipeserve.test_bounds")
            name = "x\nforged line " + "n" * HUGE
            log.info("loading %s", name, extra={"model": name})
            try:
                raise OSError(f"File name too long: {name!r}")
            except OSError:
                log.exception("loading %s failed", name)
        finally:
            logging.getLogger().removeHandler(handler)
        out = stream.getvalue()
        assert len(out) < 6_000, (fmt, len(out))
        assert "\nforged line" not in out
        if fmt == "json":
            records = [json.loads(line) for line in out.splitlines()]
            assert len(records) == 2 and records[0]["model"].startswith("x\nforged")


def test_a_streamed_config_request_id_is_checked_before_any_audio(server):
    """StreamingTranscribe carries its id in the first message's config."""
    from pipeserve.v1 import speech_recognition_pb2 as pb, speech_recognition_pb2_grpc

    first = pb.StreamingTranscribeRequest(config=pb.StreamingConfig(request_id="s" * 1000))
    with grpc.insecure_channel(server.address) as channel:
        stub = speech_recognition_pb2_grpc.SpeechRecognitionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.StreamingTranscribe(iter([first]), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(info.value) == "INVALID_REQUEST_ID"
