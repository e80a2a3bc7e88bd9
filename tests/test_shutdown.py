"""The server as a process: it starts from the command line, serves, and on SIGTERM drains —
in-flight calls finish or get UNAVAILABLE, never a hang — and exits 0 within the grace period."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(port: int, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'service'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.Popen([sys.executable, "-m", "pipeserve.server", "--listen", f"127.0.0.1:{port}", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_serving(channel, timeout=60.0) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status == \
                    health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            time.sleep(0.2)
    raise AssertionError("server did not become SERVING")


def test_sigterm_drains_and_exits(tmp_path):
    from pipeserve.v1 import model_pb2, model_pb2_grpc

    port = _free_port()
    process = _start(port, "--embedded-defaults", "false", "--grace-period-s", "5")
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        _wait_serving(channel)
        stub = model_pb2_grpc.ModelServiceStub(channel)
        codes: list[grpc.StatusCode] = []
        stop = threading.Event()

        def traffic():
            while not stop.is_set():
                try:
                    stub.ListModels(model_pb2.ListModelsRequest(), timeout=5)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
                    time.sleep(0.05)

        worker = threading.Thread(target=traffic)
        worker.start()
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        time.sleep(0.3)
        stop.set()
        worker.join(10)
        assert codes and codes[0] == grpc.StatusCode.OK
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, set(codes)
        assert codes[-1] == grpc.StatusCode.UNAVAILABLE
        assert "stopped" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
