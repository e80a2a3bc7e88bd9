"""Prometheus metrics, served over HTTP on `Settings.metrics_listen` (off when empty).

What is measured, and where it is recorded:
- per RPC, under the de-facto names go-grpc-prometheus and py-grpc-prometheus export (so
  stock gRPC dashboards and alerts work): grpc_server_started_total, grpc_server_handled_total
  (with grpc_code), the grpc_server_handling_seconds histogram, grpc_server_msg_received_total
  and grpc_server_msg_sent_total, labelled grpc_type/grpc_service/grpc_method;
- per RPC (observability.TelemetryInterceptor): requests by service/method/status code,
  errors by code and ErrorInfo reason, latency histograms per task and model, time to the
  first streamed result, calls in flight;
- per batch (DynamicBatcher.observer): batch sizes and time queued per model;
- at scrape time (read from the manager, batcher, admission gates and generation engines, so
  never stale): queue depth per model (0 for an idle loaded model, so an autoscaler scaling on
  it never sees the series vanish), resident bytes, state and in-flight calls per model;
- the process (CPU, memory, file descriptors), the Python runtime and its garbage collector
  (prometheus_client's standard collectors), and pipeserve_build_info{version,python,grpc,torch} 1.

Each server gets its own CollectorRegistry, so several servers in one process (tests) never
collide, and nothing is registered globally on import.
"""
from __future__ import annotations

import logging
import platform
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from ..bounds import metric_label
from ..errors import PipeserveError
from ..runtime.heap import heap_usage

if TYPE_CHECKING:  # pragma: no cover
    from ..api.common import App

log = logging.getLogger("pipeserve.metrics")

# Seconds: from a 1 ms cache-hot classification to a multi-minute long-form transcription.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)
# Items per batch: powers of two up to the largest max_batch_size anyone sensibly configures.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Label for a model name the manager does not hold (a typo, a fuzzer): keeps cardinality bounded.
UNKNOWN_MODEL = "unknown"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("pipeserve_requests", "Finished RPCs by service, method and status code.",
                                ["service", "method", "code"], registry=r)
        self.errors = Counter("pipeserve_errors", "Failed RPCs by status code and google.rpc.ErrorInfo reason.",
                              ["service", "method", "code", "reason"], registry=r)
        self.in_flight = Gauge("pipeserve_in_flight_requests", "RPCs being handled now.",
                               ["service", "method"], registry=r)
        self.latency = Histogram("pipeserve_request_latency_seconds",
                                 "Wall time of task RPCs, per task and model, until the last message.",
                                 ["task", "model", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_result = Histogram("pipeserve_time_to_first_result_seconds",
                                      "Streaming RPCs: time from the call to its first response message.",
                                      ["task", "model", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("pipeserve_batch_size", "Items per batch run by the dynamic batcher.",
                                    ["model", "method"], buckets=BATCH_BUCKETS, registry=r)
        self.queue_wait = Histogram("pipeserve_queue_wait_seconds", "Time an item waited for its batch to start.",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        grpc_labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.grpc_started = Counter("grpc_server_started", "RPCs started on the server.", grpc_labels, registry=r)
        self.grpc_handled = Counter("grpc_server_handled", "RPCs completed on the server, whatever their status.",
                                    grpc_labels + ["grpc_code"], registry=r)
        self.grpc_handling = Histogram("grpc_server_handling_seconds",
                                       "Time the server took to handle an RPC, until its status.",
                                       grpc_labels, buckets=LATENCY_BUCKETS, registry=r)
        self.grpc_received = Counter("grpc_server_msg_received", "RPC request messages received on the server.",
                                     grpc_labels, registry=r)
        self.grpc_sent = Counter("grpc_server_msg_sent", "RPC response messages sent by the server.",
                                 grpc_labels, registry=r)
        # The standard process_*, python_info and python_gc_* series, on this registry (the
        # global ones live on prometheus_client's default registry, which is not served).
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self._app: App | None = None
        # Set by a server whose app is bound later (it answers STARTING meanwhile).
        self.awaiting_app = False
        r.register(_BuildInfoCollector())
        r.register(_AppCollector(self))
        self.http_server: Any = None
        self.port = 0

    # ---- wiring ------------------------------------------------------------------------
    def bind(self, app: "App") -> None:
        """Reads model and queue state from `app` at scrape time; records batches from its batcher."""
        self._app = app
        app.batcher.observer = self.observe_batch

    def model_label(self, name: str) -> str:
        """A request's model as a label: the canonical name of a model the manager holds ready
        (any spelling of it counts), bounded, else "unknown" — a client's string never becomes a
        label of its own. (Unbound metrics, which have no manager to ask, label the name bounded.)"""
        if not name:
            return UNKNOWN_MODEL
        if self._app is None:
            # A server binds its app after its port answers: until then no name is known.
            return UNKNOWN_MODEL if self.awaiting_app else metric_label(name)
        try:
            entry = self._app.manager.find(name)
        except PipeserveError:  # a name no model can have (too long, control characters)
            entry = None
        if entry is None or entry.state.value != "ready":
            return UNKNOWN_MODEL
        return metric_label(entry.name)

    def observe_batch(self, model: str, method: str, size: int, waits_s: list[float]) -> None:
        model = metric_label(model)
        self.batch_size.labels(model, method).observe(size)
        for wait in waits_s:
            self.queue_wait.labels(model).observe(wait)

    # ---- HTTP endpoint -----------------------------------------------------------------
    def serve(self, listen: str) -> int:
        """Starts the /metrics HTTP endpoint on "host:port" (port 0 = any free one); returns the port."""
        host, port = split_host_port(listen)
        self.http_server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = self.http_server.server_port
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def close(self) -> None:
        if self.http_server is not None:
            self.http_server.shutdown()
            self.http_server.server_close()
            self.http_server = None


def split_host_port(listen: str) -> tuple[str, int]:
    """"0.0.0.0:9090", "[::]:9090", ":9090" -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"metrics_listen must be HOST:PORT, got {listen!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def build_labels() -> dict[str, str]:
    """What this process runs: pipeserve's version and those of the runtimes that decide its
    behaviour (read once; torch's only if it is already imported, it always is in a server)."""
    import sys

    import grpc

    from .. import __version__

    torch = sys.modules.get("torch")
    return {"version": __version__, "python": platform.python_version(), "grpc": grpc.__version__,
            "torch": getattr(torch, "__version__", "") if torch is not None else ""}


class _BuildInfoCollector:
    """pipeserve_build_info{version,python,grpc,torch} 1: the usual "info" gauge, joined on
    `version` in queries (e.g. which replicas still run an old release)."""

    def __init__(self) -> None:
        self.labels = build_labels()

    def collect(self):
        info = GaugeMetricFamily("pipeserve_build_info", "The running pipeserve version and its runtimes.",
                                 labels=list(self.labels))
        info.add_metric(list(self.labels.values()), 1)
        yield info


def queue_depth_by_model(app: "App") -> dict[str, int]:
    """Calls waiting for a model, from every queue that admits calls: the dynamic batcher, the
    speech-recognition admission gates and each text-generation engine. Every model the
    manager holds ready is present, 0 when idle: a series that vanished when idle would leave
    an autoscaler (deploy/: HPA on pipeserve_queue_depth) with no sample instead of "no load"."""
    depth: dict[str, int] = {}
    for entry in app.manager.entries():
        if entry.state.value == "ready":
            depth[entry.name] = 0
            # A pipeline with its own continuous-batching engine queues there, not in the batcher.
            engine = getattr(entry.pipeline, "engine", None)
            queued = getattr(engine, "queued", None)
            if callable(queued):
                depth[entry.name] += int(queued())
    for model, waiting in app.batcher.depth_by_model().items():
        depth[model] = depth.get(model, 0) + waiting
    if app.admission is not None:
        for model, (_running, waiting) in app.admission.depth_by_model().items():
            depth[model] = depth.get(model, 0) + waiting
    return depth


class _AppCollector:
    """Gauges read from the manager and batcher when Prometheus scrapes."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self):
        return []  # collected lazily: the registry must not call collect() at registration

    def collect(self):
        app = self.metrics._app
        depth = GaugeMetricFamily("pipeserve_queue_depth",
                                  "Calls waiting to run, per model (batcher, speech admission, generation "
                                  "engine); 0 for an idle loaded model.", labels=["model"])
        resident = GaugeMetricFamily("pipeserve_model_resident_bytes",
                                     "Bytes of weights and buffers a loaded model holds on its device.",
                                     labels=["model", "task", "device", "dtype"])
        memory = GaugeMetricFamily("pipeserve_model_memory_bytes",
                                   "A loaded model's resident bytes by kind (weights, packed, screening, cache); "
                                   "the kinds add up to pipeserve_model_resident_bytes.", labels=["model", "kind"])
        state = GaugeMetricFamily("pipeserve_model_state", "1 for the state each known model is in.",
                                  labels=["model", "state"])
        busy = GaugeMetricFamily("pipeserve_model_in_flight", "Calls currently using each model.", labels=["model"])
        heap = GaugeMetricFamily("pipeserve_heap_bytes",
                                 "The process's C heap (glibc): bytes in use, and bytes freed but held "
                                 "(allocator slack; not all of it resident), beside the models' own kinds.",
                                 labels=["state"])
        for state_name, n in (heap_usage() or {}).items():
            heap.add_metric([state_name], n)
        if app is not None:
            for model, waiting in queue_depth_by_model(app).items():
                depth.add_metric([metric_label(model)], waiting)
            for entry in app.manager.entries():
                described = entry.pipeline.describe() if entry.pipeline else {}
                name = metric_label(entry.name)
                resident.add_metric([name, entry.task.value if entry.task else "",
                                     described.get("device") or entry.options.device,
                                     described.get("dtype") or entry.options.dtype], entry.bytes)
                for kind, n in entry.memory.items():
                    memory.add_metric([name, kind], n)
                state.add_metric([name, entry.state.value], 1)
                busy.add_metric([name], entry.in_flight)
        yield from (depth, resident, memory, state, busy, heap)
