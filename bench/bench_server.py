"""A pipeserve server as its own process for a benchmark, and the memory of a process.

Benchmarks that measure what a deployment sees start the real server (`python -m
pipeserve.server`) in a child process, talk to it over a real channel, and read its resident
memory from /proc, so each side of a comparison is one process whose memory is its own.
Standard library only at import (grpc is imported where used): the reference engines' own
virtualenvs import this module too.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def process_memory(pid: int | str = "self") -> dict[str, int]:
    """Resident bytes now (VmRSS) and the process's peak so far (VmHWM)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return {"rss_bytes": fields.get("VmRSS", 0), "peak_bytes": fields.get("VmHWM", 0)}


def process_memory_mib(pid: int | str = "self") -> dict[str, float]:
    """VmRSS and VmHWM (peak) in MiB, keyed as /proc names them."""
    memory = process_memory(pid)
    return {"VmRSS": memory["rss_bytes"] / (1 << 20), "VmHWM": memory["peak_bytes"] / (1 << 20)}


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU time a process has used so far (all its threads), in seconds. Unlike
    wall time, other processes' load on a shared machine hardly changes it."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def start_server(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
    """`python -m pipeserve.server --listen <free port> *args`, this checkout's service/ first on
    the path, HF_HUB_OFFLINE; output to `log_path`. Returns the process and its port."""
    port = free_port()
    environment = dict(os.environ, HF_HUB_OFFLINE="1",
                       PYTHONPATH=os.pathsep.join([str(ROOT / "service"), str(ROOT / "clients" / "python"),
                                                   os.environ.get("PYTHONPATH", "")]))
    environment.update(env or {})
    process = subprocess.Popen([sys.executable, "-m", "pipeserve.server", "--listen", f"{LOOPBACK}:{port}", *args],
                               env=environment, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    return process, port


def wait_serving(port: int, services: list[str], process: subprocess.Popen, timeout: float = 300) -> None:
    """Until health reports every one of `services` SERVING (the preloads have loaded)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.time() + timeout
    with grpc.insecure_channel(f"{LOOPBACK}:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in services:
            while True:
                if process.poll() is not None:
                    raise SystemExit(f"server exited with {process.returncode}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status == 1:
                        break
                except grpc.RpcError:
                    pass
                if time.time() > deadline:
                    raise SystemExit(f"{service} did not become SERVING")
                time.sleep(0.2)
