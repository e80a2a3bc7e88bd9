"""URI inputs against local HTTP servers: malformed URIs and user info are INVALID_ARGUMENT
(never INTERNAL), allowlist entries with a port allow only that port, sizes are enforced while
streaming, and slow-drip fetches end at the request's deadline or the server's cap, releasing
their connection and worker, so the next fetch is not starved."""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from http_fixtures import LocalHttpServer
from ops_testing import png
from pipeserve.inputs import uri
from pipeserve.config import Settings
from pipeserve.errors import PipeserveError


@pytest.fixture(scope="module")
def web():
    server = LocalHttpServer(body=png(3))
    yield server
    server.close()


def _settings(web, **changes) -> Settings:
    return Settings(uri_http_hosts=(web.host,), **changes)


def _refusal(call) -> PipeserveError:
    with pytest.raises(PipeserveError) as info:
        call()
    return info.value


def _malformed(web, tmp_path) -> list[str]:
    base = f"http://127.0.0.1:{web.port}"
    return [
        base + "/file\x00.png",                       # NUL
        base + "/file\r\nX-Injected: yes",            # header injection
        base + "/file\n",
        f"http://127.0.0.1:{web.port}@evil.example/",  # user info that hides the real host
        f"http://user:secret@127.0.0.1:{web.port}/file",
        f"http://evil.example@127.0.0.1:{web.port}/file",
        "http://[::1/file",                           # unbalanced IPv6 bracket
        "http://127.0.0.1:99999/file",                # port out of range
        "http://127.0.0.1:port/file",
        "http:///file",                               # no host
        base + "/" + "a" * 10_000,                    # absurdly long
        f"file://{tmp_path}/a\x00b",
        f"file://{tmp_path}/a%00b",                   # NUL once decoded
        "file://" + str(tmp_path) + "/a\r\nb",
    ]


def test_malformed_uris_and_user_info_are_invalid_uri(web, tmp_path):
    settings = _settings(web, uri_file_root=str(tmp_path))
    for bad in _malformed(web, tmp_path):
        error = _refusal(lambda: uri.fetch(bad, settings, 1 << 20))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "INVALID_URI", (bad, error)
        assert len(error.message) < 400  # the URI is bounded in the message
    assert not any("evil" in r or "Injected" in r for r in web.requests)


def test_allowlist_entry_with_a_port_allows_only_that_port(web):
    assert uri.fetch(web.url("/file"), _settings(web), 1 << 20) == png(3)
    other_port = web.port + 1 if web.port < 65535 else web.port - 1
    for entries in ((f"127.0.0.1:{other_port}",), ("127.0.0.1",), ("127.0.0.2", f"localhost:{web.port}")):
        error = _refusal(lambda: uri.fetch(web.url("/file"), Settings(uri_http_hosts=entries), 1 << 20))
        assert error.reason == "URI_NOT_ALLOWED", entries
    # A bare host allows the scheme's default port only.
    assert uri.host_allowed("example.com", 80, "http", ("example.com",))
    assert uri.host_allowed("example.com", 443, "https", ("Example.COM",))
    assert not uri.host_allowed("example.com", 8080, "http", ("example.com",))
    assert uri.host_allowed("example.com", 8080, "https", ("example.com:8080",))
    assert uri.host_allowed("::1", 8080, "http", ("[::1]:8080",))


def test_size_is_enforced_while_streaming(web):
    started = time.monotonic()
    error = _refusal(lambda: uri.fetch(web.url("/endless"), _settings(web), 1 << 20))
    assert error.reason == "INPUT_TOO_LARGE"
    # A declared length over the limit is refused before the (slow) body is read.
    error = _refusal(lambda: uri.fetch(web.url("/drip-declared"), _settings(web), 1 << 20))
    assert error.reason == "INPUT_TOO_LARGE"
    assert time.monotonic() - started < 20
    assert web.wait_no_drips(10)
    assert web.sent < 64 << 20  # the endless body stopped soon after the limit


@pytest.mark.parametrize("path", ["/drip", "/drip-headers"])
def test_slow_drip_ends_at_the_server_cap(web, path):
    settings = _settings(web, uri_fetch_timeout_s=1.5)
    started = time.monotonic()
    error = _refusal(lambda: uri.fetch(web.url(path), settings, 1 << 20))
    elapsed = time.monotonic() - started
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED and error.reason == "URI_FETCH_TIMEOUT"
    assert 1.0 < elapsed < 10, elapsed
    assert web.wait_no_drips(10)


def test_a_caller_deadline_shorter_than_the_cap_wins(web):
    started = time.monotonic()
    error = _refusal(lambda: uri.fetch(web.url("/drip"), _settings(web, uri_fetch_timeout_s=300), 1 << 20,
                                       timeout_s=1.0))
    assert error.reason == "URI_FETCH_TIMEOUT" and time.monotonic() - started < 10


def test_cancelled_async_fetch_frees_its_connection_and_worker(web):
    settings = _settings(web, uri_fetch_timeout_s=300, uri_fetch_concurrency=2)

    async def scenario():
        slow = [asyncio.ensure_future(uri.fetch_async(web.url("/drip"), settings, 1 << 20)) for _ in range(2)]
        await asyncio.sleep(1.0)
        # Both workers are busy: a third fetch is refused at once (retryable), not queued behind them.
        with pytest.raises(PipeserveError) as busy:
            await uri.fetch_async(web.url("/file"), settings, 1 << 20)
        assert busy.value.reason == "QUEUE_FULL"
        for task in slow:  # what grpc.aio does to a handler when its deadline passes
            task.cancel()
        await asyncio.gather(*slow, return_exceptions=True)
        assert await asyncio.get_running_loop().run_in_executor(None, web.wait_no_drips, 10)
        started = time.monotonic()
        data = await uri.fetch_async(web.url("/file"), settings, 1 << 20)
        return data, time.monotonic() - started

    data, elapsed = asyncio.run(scenario())
    assert data == png(3) and elapsed < 10


# ---- through a real server --------------------------------------------------------------------

@pytest.fixture(scope="module")
def uri_server(web, tmp_path_factory):
    from grpc_testing import load_model, make_server
    from ops_testing import build_tiny_vit

    server = make_server(uri_http_hosts=(web.host,), uri_file_root=str(tmp_path_factory.mktemp("uri_root")),
                         uri_fetch_timeout_s=300)
    load_model(server, build_tiny_vit(tmp_path_factory.mktemp("uri_vit")))
    yield server
    server.stop()


def _classify(server, address: str, timeout: float):
    from pipeserve.v1 import common_pb2, image_classification_pb2 as pb, image_classification_pb2_grpc

    stub = image_classification_pb2_grpc.ImageClassificationServiceStub(server.channel)
    return stub.ClassifyImage(pb.ClassifyImageRequest(image=common_pb2.ImageInput(uri=address)), timeout=timeout)


def test_grpc_malformed_uris_are_invalid_argument(uri_server, web, tmp_path):
    from grpc_testing import error_reason

    for bad in _malformed(web, tmp_path):
        with pytest.raises(grpc.RpcError) as info:
            _classify(uri_server, bad, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (bad, info.value.details())
        # An overlong URI meets the request-size table first (api/limits.py, same bound as uri.py).
        expected = "INPUT_TOO_LARGE" if len(bad) > uri.MAX_URI_CHARS else "INVALID_URI"
        assert error_reason(info.value) == expected, (bad, info.value.details())


def test_grpc_slow_drips_obey_the_deadline_and_do_not_starve_the_next_fetch(uri_server, web):
    """Ten slow-drip fetches (more than the default executor's workers on this machine) with a
    short deadline; the server's cap is 300 s, so only the deadline can end them."""
    with ThreadPoolExecutor(10) as callers:
        futures = [callers.submit(_classify, uri_server, web.url("/drip"), 2.0) for _ in range(10)]
        for future in futures:
            with pytest.raises(grpc.RpcError) as info:
                future.result(60)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert web.wait_no_drips(15), f"{web.dripping} drips still connected"
    started = time.monotonic()
    response = _classify(uri_server, web.url("/file"), timeout=60)
    assert len(response.labels) > 0
    assert time.monotonic() - started < 20
