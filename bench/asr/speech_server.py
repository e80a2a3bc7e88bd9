"""Shared pieces of the ASR benches that drive a real pipeserve server process: a free port,
the speech-only server started as a deployment would start it, waiting for its first
transcript (the server answers UNAVAILABLE while it starts), and a process's memory from
/proc. Kept free of torch so a load-generating client process stays small.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

# The speech-only server of issue #16: nothing but the embedded Whisper tiny.en preloaded.
SPEECH_ONLY_ARGS = ("--embedded-defaults", "false",
                    "--preload", "automatic-speech-recognition=embedded/whisper-tiny.en")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) of a process, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (all its threads), in seconds. Unlike
    wall time, other processes' load on a shared machine hardly changes it."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def start_server(port: int, extra: list[str] | tuple[str, ...] = SPEECH_ONLY_ARGS) -> subprocess.Popen:
    """`python -m pipeserve.server` on 127.0.0.1:port (this interpreter, this PYTHONPATH)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "pipeserve.server", "--listen", f"127.0.0.1:{port}", *extra],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def call_when_ready(call, server: subprocess.Popen, timeout_s: float = 300.0):
    """Retries `call()` while the server starts (connection refused, then STARTING: both
    UNAVAILABLE); returns its first answer. Raises if the server exits or never answers."""
    import grpc

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or server.poll() is not None:
                raise
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not become ready") from error
            time.sleep(0.02)


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
