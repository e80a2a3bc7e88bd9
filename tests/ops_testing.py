"""Helpers for the production tests (security, metrics, faults, fuzz, load): a tiny random ViT
checkpoint, PNG bytes, free ports, and pipeserve server processes on loopback."""
from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]


def build_tiny_vit(directory: Path) -> Path:
    """A random ViTForImageClassification (hidden 32, 2 layers, 32x32 input, 6 labels) with its
    image processor, saved as safetensors: the smallest real model the server can serve."""
    import torch
    import transformers
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    from harness import save_checkpoint

    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=37, image_size=32, patch_size=8, num_labels=6,
                                    id2label={i: f"class_{i}" for i in range(6)},
                                    label2id={f"class_{i}": i for i in range(6)})
    model = transformers.ViTForImageClassification(config).eval()
    return save_checkpoint(model, directory, ViTImageProcessorPil(size={"height": 32, "width": 32}))


def png(seed: int = 0, size: tuple[int, int] = (40, 30)) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def classify_request(model: str = "", seed: int = 0, **fields):
    from pipeserve.v1 import common_pb2, image_classification_pb2 as pb

    return pb.ClassifyImageRequest(model=model, image=common_pb2.ImageInput(data=png(seed)), **fields)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m pipeserve.server` on 127.0.0.1:<port> with the given flags."""

    def __init__(self, *args: str, port: int | None = None, env: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        environ = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
        environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "service"), environ.get("PYTHONPATH", "")])
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"pipeserve-{self.port}-{time.time_ns()}.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeserve.server", "--listen", self.address, "--embedded-defaults", "false",
             *args], env=environ, stdout=self._log, stderr=subprocess.STDOUT, text=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def wait_serving(self, service: str = "", timeout: float = 120.0, channel=None) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        own = channel is None
        channel = channel or grpc.insecure_channel(self.address)
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.time() + timeout
        try:
            while time.time() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(f"server exited with {self.process.returncode}:\n{self.output()[-3000:]}")
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        finally:
            if own:
                channel.close()
        raise AssertionError(f"{service or 'server'} did not become SERVING:\n{self.output()[-3000:]}")

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)
        self._log.close()

    def rss_bytes(self) -> int:
        return rss_bytes(self.pid)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def in_memory_spans():
    """An InMemorySpanExporter receiving every span of this process: OpenTelemetry's global
    tracer provider can be set only once per process, so a test that finds an SDK provider
    already set adds its exporter to that one."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def scrape_metrics(handle) -> dict[str, list]:
    """{sample name: [(labels, value), ...]} from a running server's live /metrics endpoint."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    port = handle.running.metrics.port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


class StandInContext:
    """The parts of a grpc.aio ServicerContext that interceptors read, for calling a wrapped
    handler directly in a test."""

    def __init__(self, metadata=()):
        self._metadata = metadata

    def invocation_metadata(self):
        return self._metadata

    def peer(self):
        return "ipv4:127.0.0.1:1"

    def code(self):
        return None

    def time_remaining(self):
        return None

    def trailing_metadata(self):
        return ()
