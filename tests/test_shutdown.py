"""The server as a process: it starts from the command line, serves, and on SIGTERM drains —
in-flight calls finish or get UNAVAILABLE, never a hang — and exits 0 within the grace period."""
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


def test_drain_waits_for_a_quiet_moment_within_its_limit():
    import asyncio

    from pipeserve.drain import Drain

    async def scenario():
        drain = Drain()
        assert await drain.wait_for_quiet(0.0) < 0.01  # no grace: stop at once
        quiet = await drain.wait_for_quiet(5.0, quiet_s=0.05)
        assert 0.05 <= quiet < 1.0  # waits the quiet time even when the last call is old

        async def steady_traffic():
            while True:
                drain.note_arrival()
                await asyncio.sleep(0.01)

        traffic = asyncio.get_running_loop().create_task(steady_traffic())
        try:
            busy = await drain.wait_for_quiet(0.3, quiet_s=0.05)
        finally:
            traffic.cancel()
        assert 0.3 <= busy < 1.0  # never quiet: bounded by the limit
        assert await drain.wait_for_quiet(5.0, quiet_s=0.05) < 1.0  # traffic gone: quiet again

    asyncio.run(scenario())
