"""The standard metrics a platform's dashboards expect, scraped from a live server: the
grpc_server_* series of go-grpc-prometheus / py-grpc-prometheus after unary calls (ok and
failed) and a server stream, streamed messages counted each way (bidi, through the real
interceptor), the process/Python collectors, pipeserve_build_info; pipeserve_queue_depth at 0
for idle models and counting calls that wait for speech-recognition admission; trace ids in
the logs with tracing on; and the Python client's W3C traceparent reaching the server."""
from __future__ import annotations

import asyncio
import io
import json
import logging
from contextlib import AsyncExitStack

import grpc
import pytest

from grpc_testing import load_model, make_server
from ops_testing import build_tiny_vit, classify_request, in_memory_spans, png, scrape_metrics as scrape
from ops_testing import StandInContext as _Context

prometheus_client = pytest.importorskip("prometheus_client")

IMAGE_SERVICE = "pipeserve.v1.ImageClassificationService"
GENERATION_SERVICE = "pipeserve.v1.TextGenerationService"
PARENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = f"00-{PARENT_TRACE}-b7ad6b7169203331-01"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from generation_checkpoints import build

    vit = build_tiny_vit(tmp_path_factory.mktemp("std_metrics_vit"))
    gpt2 = tmp_path_factory.mktemp("std_metrics_gpt2")
    build("gpt2", gpt2)
    return str(vit), str(gpt2)


@pytest.fixture(scope="module")
def server(checkpoints):
    handle = make_server(metrics_listen="127.0.0.1:0")
    for path in checkpoints:
        load_model(handle, path)
    yield handle
    handle.stop()




def total(samples, name: str, **labels) -> float:
    """The sum of `name`'s samples with these labels (0 when there are none)."""
    return sum(v for l, v in samples.get(name, []) if all(l.get(k) == w for k, w in labels.items()))


def test_grpc_server_metrics_after_ok_failed_and_streamed_calls(server, checkpoints):
    from pipeserve_client import Client, InvalidArgumentError

    vit, gpt2 = checkpoints
    image = {"grpc_type": "unary", "grpc_service": IMAGE_SERVICE, "grpc_method": "ClassifyImage"}
    stream = {"grpc_type": "server_stream", "grpc_service": GENERATION_SERVICE, "grpc_method": "GenerateStream"}
    before = scrape(server)
    with Client(server.address, timeout=60) as client:
        for seed in range(3):
            assert client.classify_image(png(seed), model=vit).labels
        with pytest.raises(InvalidArgumentError):
            client.classify_image(b"not an image", model=vit)
        messages = list(client.generate("hello", model=gpt2, stream=True, max_new_tokens=4, ignore_eos=True))
    assert len(messages) >= 2
    after = scrape(server)

    def delta(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("grpc_server_started_total", **image) == 4
    assert delta("grpc_server_handled_total", **image, grpc_code="OK") == 3
    assert delta("grpc_server_handled_total", **image, grpc_code="INVALID_ARGUMENT") == 1
    assert delta("grpc_server_handling_seconds_count", **image) == 4
    assert delta("grpc_server_handling_seconds_bucket", **image, le="+Inf") == 4
    assert delta("grpc_server_handling_seconds_sum", **image) > 0
    assert delta("grpc_server_msg_received_total", **image) == 4
    assert delta("grpc_server_msg_sent_total", **image) == 3  # a failed unary call sends no message
    # The stream: one request, every response message counted.
    assert delta("grpc_server_started_total", **stream) == 1
    assert delta("grpc_server_handled_total", **stream, grpc_code="OK") == 1
    assert delta("grpc_server_msg_received_total", **stream) == 1
    assert delta("grpc_server_msg_sent_total", **stream) == len(messages)
    # ModelService calls are counted under the same names (LoadModel ran at start).
    assert total(after, "grpc_server_handled_total", grpc_service="pipeserve.v1.ModelService",
                 grpc_method="LoadModel", grpc_code="OK") >= 2
    # The standard process and Python collectors, on the registry the endpoint serves.
    assert total(after, "process_resident_memory_bytes") > 0
    assert total(after, "process_open_fds") > 0
    assert total(after, "process_cpu_seconds_total") > 0
    assert after["python_info"] and after["python_gc_objects_collected_total"]
    # Build info: one sample, value 1, with the running version.
    from pipeserve import __version__

    [(labels, value)] = after["pipeserve_build_info"]
    assert value == 1 and labels["version"] == __version__ and labels["python"] and labels["torch"]


async def test_bidi_stream_messages_are_counted_both_ways():
    """The interceptor's wrapper counts each message a client streams in and each it gets back
    (driven directly with a bidi handler, as grpc.aio would call it)."""
    from pipeserve.serving.metrics import Metrics
    from pipeserve.serving.observability import TelemetryInterceptor

    metrics = Metrics()
    interceptor = TelemetryInterceptor(metrics=metrics, tracer=None, tasks={})

    async def echo_twice(requests, context):
        async for message in requests:
            yield message
            yield message

    class Details:
        method = "/pipeserve.v1.SpeechRecognitionService/StreamingTranscribe"

    async def continuation(details):
        return grpc.stream_stream_rpc_method_handler(echo_twice)

    async def incoming():
        for item in ("a", "b", "c"):
            yield item

    handler = await interceptor.intercept_service(continuation, Details())
    assert [m async for m in handler.stream_stream(incoming(), _Context())] == ["a", "a", "b", "b", "c", "c"]
    labels = {"grpc_type": "bidi_stream", "grpc_service": "pipeserve.v1.SpeechRecognitionService",
              "grpc_method": "StreamingTranscribe"}
    registry = metrics.registry
    assert registry.get_sample_value("grpc_server_msg_received_total", labels) == 3
    assert registry.get_sample_value("grpc_server_msg_sent_total", labels) == 6
    assert registry.get_sample_value("grpc_server_started_total", labels) == 1
    assert registry.get_sample_value("grpc_server_handled_total", dict(labels, grpc_code="OK")) == 1


def test_queue_depth_is_zero_when_idle_and_counts_speech_admission(server, checkpoints):
    """Every loaded model has a queue-depth sample, 0 when nothing waits (an HPA scaling on it
    must read "no load", not "no data"); calls waiting for a speech-recognition admission slot
    count as waiting, as batcher and generation-engine queues do."""
    vit, gpt2 = checkpoints
    idle = scrape(server)
    depth = {labels["model"]: value for labels, value in idle.get("pipeserve_queue_depth", [])}
    assert depth.get(vit) == 0 and depth.get(gpt2) == 0, depth

    app = server.running.app
    name = server.manager.find(vit).name
    running = app.admission.running

    async def hold_all_and_queue(waiters: int):
        """Takes every slot of the model, then queues `waiters` more callers."""
        stack = AsyncExitStack()
        for _ in range(running):
            await stack.enter_async_context(app.admission.slot(name, 1))

        async def wait_for_slot():
            async with app.admission.slot(name, 1):
                pass
        tasks = [asyncio.ensure_future(wait_for_slot()) for _ in range(waiters)]
        await asyncio.sleep(0)  # let them reach the queue
        return stack, tasks

    stack, tasks = server.call(hold_all_and_queue(2))
    try:
        assert total(scrape(server), "pipeserve_queue_depth", model=vit) == 2
    finally:
        async def release():
            await stack.aclose()
            await asyncio.gather(*tasks)
        server.call(release())
    assert total(scrape(server), "pipeserve_queue_depth", model=vit) == 0


@pytest.fixture(scope="module")
def traced(checkpoints):
    pytest.importorskip("opentelemetry.sdk")
    exporter = in_memory_spans()
    handle = make_server(tracing=True)
    load_model(handle, checkpoints[0])
    yield handle, exporter
    handle.stop()


def _captured_access_log(formatter: logging.Formatter):
    from pipeserve.serving.logs import RequestIdFilter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(formatter)
    return stream, handler


class _AccessLog:
    """pipeserve.access at DEBUG (every call logged) into `handler` for the block."""

    def __init__(self, handler):
        self.handler, self.logger = handler, logging.getLogger("pipeserve.access")

    def __enter__(self):
        self.level = self.logger.level
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.DEBUG)

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)


def test_logs_carry_trace_and_span_ids_with_tracing_on(traced, checkpoints):
    from pipeserve.serving.logs import TEXT_FORMAT, JsonFormatter, TextFormatter
    from pipeserve.v1 import image_classification_pb2_grpc

    handle, exporter = traced
    json_stream, json_handler = _captured_access_log(JsonFormatter())
    text_stream, text_handler = _captured_access_log(TextFormatter(TEXT_FORMAT))
    stub = image_classification_pb2_grpc.ImageClassificationServiceStub(handle.channel)
    with _AccessLog(json_handler), _AccessLog(text_handler):
        stub.ClassifyImage(classify_request(checkpoints[0], request_id="log-trace-1"), timeout=60,
                           metadata=(("traceparent", PARENT),))
    [span] = [s for s in exporter.get_finished_spans() if s.attributes.get("pipeserve.request_id") == "log-trace-1"]
    span_id = format(span.context.span_id, "016x")
    [line] = [json.loads(l) for l in json_stream.getvalue().splitlines() if "log-trace-1" in l]
    assert line["trace_id"] == PARENT_TRACE and line["span_id"] == span_id
    [text] = [l for l in text_stream.getvalue().splitlines() if "log-trace-1" in l]
    assert f"[log-trace-1 trace_id={PARENT_TRACE} span_id={span_id}]" in text


def test_logs_have_no_trace_ids_with_tracing_off(server, checkpoints):
    from pipeserve.serving.logs import JsonFormatter
    from pipeserve.v1 import image_classification_pb2_grpc

    stream, handler = _captured_access_log(JsonFormatter())
    stub = image_classification_pb2_grpc.ImageClassificationServiceStub(server.channel)
    with _AccessLog(handler):
        stub.ClassifyImage(classify_request(checkpoints[0], request_id="untraced-1"), timeout=60,
                           metadata=(("traceparent", PARENT),))
    [line] = [json.loads(l) for l in stream.getvalue().splitlines() if "untraced-1" in l]
    assert "trace_id" not in line and "span_id" not in line


def _server_span(exporter, request_id: str):
    [span] = [s for s in exporter.get_finished_spans() if s.attributes.get("pipeserve.request_id") == request_id]
    return span


def test_python_client_propagates_traceparent(traced, checkpoints):
    """The sync and async clients send the caller's traceparent (given, or the current
    OpenTelemetry span's) as metadata, and the server's span joins that trace."""
    from opentelemetry import trace

    import pipeserve_client
    from pipeserve_client import AsyncClient, Client, InputError

    handle, exporter = traced
    vit = checkpoints[0]
    with Client(handle.address, timeout=60) as client:
        # A caller-given traceparent (e.g. from an upstream HTTP request).
        with pipeserve_client.traceparent(PARENT):
            client.classify_image(png(1), model=vit, request_id="given-1")
        # The current OpenTelemetry span, when there is one.
        with trace.get_tracer("test").start_as_current_span("caller") as caller:
            client.classify_image(png(2), model=vit, request_id="otel-1")
        # Neither: the server's span starts a trace of its own.
        client.classify_image(png(3), model=vit, request_id="none-1")
        with pytest.raises(InputError):
            with pipeserve_client.traceparent("00-not-a-traceparent"):
                pass

    async def async_call():
        async with AsyncClient(handle.address, timeout=60) as aclient:
            with pipeserve_client.traceparent(PARENT):
                await aclient.classify_image(png(4), model=vit, request_id="given-async-1")
    asyncio.run(async_call())

    for request_id in ("given-1", "given-async-1"):
        span = _server_span(exporter, request_id)
        assert format(span.context.trace_id, "032x") == PARENT_TRACE
        assert format(span.parent.span_id, "016x") == "b7ad6b7169203331"
    otel = _server_span(exporter, "otel-1")
    assert otel.context.trace_id == caller.get_span_context().trace_id
    assert otel.parent.span_id == caller.get_span_context().span_id
    alone = _server_span(exporter, "none-1")
    assert alone.parent is None and alone.context.trace_id not in (caller.get_span_context().trace_id,
                                                                   int(PARENT_TRACE, 16))
