"""The server as a process: it starts from the command line, serves, and on SIGTERM drains —
in-flight calls finish, new ones get UNAVAILABLE, none gets CANCELLED, never a hang — and exits
0 within the grace period."""
from __future__ import annotations

import threading
import time

import grpc

from ops_testing import ServerProcess


def test_sigterm_drains_and_exits():
    from pipeserve.v1 import model_pb2, model_pb2_grpc

    server = ServerProcess("--grace-period-s", "5")
    try:
        server.wait_serving(timeout=60)
        channel = grpc.insecure_channel(server.address)
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
        server.terminate()
        assert server.process.wait(timeout=20) == 0
        time.sleep(0.3)
        stop.set()
        worker.join(10)
        channel.close()
        assert codes and codes[0] == grpc.StatusCode.OK
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, set(codes)
        assert codes[-1] == grpc.StatusCode.UNAVAILABLE
        assert "stopped" in server.output()
    finally:
        server.kill()


def test_drain_holds_admitted_calls_and_turns_new_ones_away():
    """Calls admitted before the drain run to the end (within the grace); calls after it get
    UNAVAILABLE/DRAINING; the drain returns the grace left after the UNAVAILABLE window."""
    import asyncio

    import pytest

    from pipeserve.serving.drain import Drain
    from pipeserve.errors import Draining

    async def scenario():
        drain = Drain()
        assert await drain.drain(0.0) == 0.0  # no grace: stop at once

        drain = Drain()
        finished = asyncio.Event()

        async def call(duration_s):
            with drain.admit():
                await asyncio.sleep(duration_s)
            finished.set()

        running = asyncio.ensure_future(call(0.3))
        await asyncio.sleep(0)
        assert drain.in_flight == 1
        left = await drain.drain(5.0, window_s=0.1)
        assert finished.is_set() and drain.in_flight == 0
        assert 4.0 < left < 4.75
        await running
        with pytest.raises(Draining):
            with drain.admit():
                pass

        drain = Drain()
        stuck = asyncio.ensure_future(call(30))
        await asyncio.sleep(0)
        assert await drain.drain(0.2, window_s=0.1) == 0.0  # bounded by the grace
        assert drain.in_flight == 1
        stuck.cancel()

    asyncio.run(scenario())


def test_sigterm_drains_without_cancelled_under_load():
    """Clients calling back-to-back (no pause after UNAVAILABLE) through SIGTERM, while a busy
    process competes for the CPU: every call is OK or UNAVAILABLE, never CANCELLED, in each of
    several shutdowns (grpc core's own shutdown cancelled a few calls in most of them)."""
    import collections
    import subprocess
    import sys

    from pipeserve.v1 import model_pb2, model_pb2_grpc

    shutdowns, clients = 5, 4
    servers = [ServerProcess("--grace-period-s", "5") for _ in range(shutdowns)]
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for server in servers:
            server.wait_serving(timeout=120)
        for server in servers:
            codes: collections.Counter = collections.Counter()
            stop = threading.Event()

            def hammer():
                with grpc.insecure_channel(server.address) as channel:
                    stub = model_pb2_grpc.ModelServiceStub(channel)
                    while not stop.is_set():
                        try:
                            stub.ListModels(model_pb2.ListModelsRequest(), timeout=10)
                            codes[grpc.StatusCode.OK] += 1
                        except grpc.RpcError as exc:
                            codes[exc.code()] += 1

            workers = [threading.Thread(target=hammer) for _ in range(clients)]
            for worker in workers:
                worker.start()
            time.sleep(0.3)
            server.terminate()
            exit_code = server.process.wait(timeout=30)
            time.sleep(0.2)
            stop.set()
            for worker in workers:
                worker.join(15)
            assert exit_code == 0, server.output()[-2000:]
            assert codes[grpc.StatusCode.OK] > 0 and codes[grpc.StatusCode.UNAVAILABLE] > 0, codes
            assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
            assert "stopped" in server.output()
    finally:
        burner.kill()
        burner.wait()
        for server in servers:
            server.kill()
