"""Shared pieces of the ASR benches that drive a real pipeserve server process: a free port,
the speech-only server started as a deployment would start it, waiting for its first
transcript (the server answers UNAVAILABLE while it starts), and a process's memory from
/proc. Kept free of torch so a load-generating client process stays small.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Re-exported for the ASR benches: one copy of each in bench/bench_server.py.
from bench_server import cpu_seconds, free_port, process_memory_mib as proc_status  # noqa: E402

__all__ = ["SPEECH_ONLY_ARGS", "call_when_ready", "cpu_seconds", "free_port", "proc_status", "start_server",
           "stop_server"]

# The speech-only server of issue #16: nothing but the embedded Whisper tiny.en preloaded.
SPEECH_ONLY_ARGS = ("--embedded-defaults", "false",
                    "--preload", "automatic-speech-recognition=embedded/whisper-tiny.en")


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
