"""The HTTP front door's error mapping and its answers while the server drains: each gRPC
code becomes its HTTP status in OpenAI's error shape with our reason, 429 and 503 carry
Retry-After (the server's retry_after_ms when it names one), and a draining server answers
/readyz and every call with 503 DRAINING while /healthz stays 200; a chunked body over
max_message_bytes is 413 too."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import pytest

from grpc_testing import make_server


def _rpc_error(code: grpc.StatusCode, reason: str = "", **metadata: str) -> grpc.aio.AioRpcError:
    from google.protobuf import any_pb2
    from google.rpc import error_details_pb2, status_pb2

    trailing = grpc.aio.Metadata()
    if reason:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="pipeserve.dev", metadata=metadata))
        status = status_pb2.Status(code=code.value[0], message="why", details=[detail])
        trailing.add("grpc-status-details-bin", status.SerializeToString())
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details="why")


@pytest.mark.parametrize("code, status, kind", [
    (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    (grpc.StatusCode.FAILED_PRECONDITION, 400, "invalid_request_error"),
    (grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
    (grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error"),
    (grpc.StatusCode.NOT_FOUND, 404, "not_found_error"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
    (grpc.StatusCode.UNAVAILABLE, 503, "server_error"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "server_error"),
    (grpc.StatusCode.INTERNAL, 500, "server_error"),
    (grpc.StatusCode.UNKNOWN, 500, "server_error"),
])
def test_codes_map_to_http_statuses(code, status, kind):
    from pipeserve.http.errors import from_rpc_error

    response = from_rpc_error(_rpc_error(code, "SOME_REASON", field="options.top_p"))
    body = json.loads(response.body)
    assert response.status == status
    assert body == {"error": {"message": "why", "type": kind, "code": "some_reason", "param": "options.top_p",
                              "reason": "SOME_REASON"}}
    assert ("Retry-After" in response.headers) == (status in (429, 503))


def test_retry_after_follows_the_server():
    from pipeserve.http.errors import DEFAULT_RETRY_AFTER_S, from_rpc_error

    named = from_rpc_error(_rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL", retry_after_ms="1500"))
    assert named.status == 429 and named.headers["Retry-After"] == "2"  # rounded up: never too early
    unnamed = from_rpc_error(_rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL"))
    assert unnamed.headers["Retry-After"] == str(DEFAULT_RETRY_AFTER_S)
    bare = json.loads(from_rpc_error(_rpc_error(grpc.StatusCode.CANCELLED)).body)
    assert bare["error"]["reason"] == "CANCELLED"  # no ErrorInfo: the code's name stands in


def _get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.status, dict(answer.headers), json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def _post_chunked(port: int, path: str, pieces) -> tuple[int, dict]:
    """A body with no Content-Length (chunked): its size is known only while it is read."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", path, body=iter(pieces), encode_chunked=True,
                           headers={"Content-Type": "application/json"})
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        connection.close()


def test_draining_server_answers_503():
    handle = make_server(http_listen="127.0.0.1:0", max_message_bytes=4096)
    try:
        base = f"http://127.0.0.1:{handle.running.http.port}"
        # Over max_message_bytes without a Content-Length: refused while reading, still 413.
        status, body = _post_chunked(handle.running.http.port, "/v1/embeddings",
                                     [b'{"input": "', *[b"x" * 1024] * 8, b'"}'])
        assert status == 413 and body["error"]["reason"] == "INPUT_TOO_LARGE"
        assert _get(base + "/readyz")[0] == 200
        assert _get(base + "/v1/models")[0] == 200
        handle.call(handle.running.drain_calls(0))
        status, headers, body = _get(base + "/v1/models")
        assert status == 503 and body["error"]["reason"] == "DRAINING" and headers["Retry-After"]
        assert _get(base + "/readyz")[0] == 503
        assert _get(base + "/healthz")[0] == 200  # alive, just not taking work
        status, _, body = _get(base + "/v1/nothing-here")
        assert status == 404 and body["error"]["type"] == "not_found_error"
    finally:
        handle.stop()
