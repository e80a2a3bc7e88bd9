"""Security through real channels: TLS with a CA generated here, mutual TLS refusing clients
without a certificate (or with one from another CA), bearer tokens (UNAUTHENTICATED), admin-only
ModelService writes (PERMISSION_DENIED), health and reflection left open, and the per-client
limit on concurrent streams."""
from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grpc_testing import error_reason, make_server
from ops_testing import build_tiny_vit, classify_request

cryptography = pytest.importorskip("cryptography")


# ---- a CA, a server certificate and client certificates, made for this test run -------------
def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer_name: str, issuer_key, *, ca: bool, server: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    elif server:
        builder = (builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(obj) -> bytes:
    from cryptography.hazmat.primitives import serialization

    if hasattr(obj, "private_bytes"):
        return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    return obj.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """{name: path} for ca, server cert/key, client cert/key (signed by ca) and a rogue
    client cert/key signed by an unrelated CA."""
    d = tmp_path_factory.mktemp("pki")
    ca_key, rogue_ca_key = _key(), _key()
    ca = _cert("pipeserve test CA", ca_key, "pipeserve test CA", ca_key, ca=True)
    rogue_ca = _cert("rogue CA", rogue_ca_key, "rogue CA", rogue_ca_key, ca=True)
    server_key, client_key, rogue_key = _key(), _key(), _key()
    files = {
        "ca": ca, "rogue_ca": rogue_ca,
        "server": _cert("localhost", server_key, "pipeserve test CA", ca_key, ca=False, server=True),
        "server_key": server_key,
        "client": _cert("client-1", client_key, "pipeserve test CA", ca_key, ca=False), "client_key": client_key,
        "rogue": _cert("rogue-client", rogue_key, "rogue CA", rogue_ca_key, ca=False), "rogue_key": rogue_key,
    }
    paths = {}
    for name, obj in files.items():
        paths[name] = d / f"{name}.pem"
        paths[name].write_bytes(_pem(obj))
    return paths


def _secure_channel(address, pki, *, client: str | None = None, root: str = "ca"):
    key = pki[f"{client}_key"].read_bytes() if client else None
    chain = pki[client].read_bytes() if client else None
    credentials = grpc.ssl_channel_credentials(root_certificates=pki[root].read_bytes(),
                                               private_key=key, certificate_chain=chain)
    return grpc.secure_channel(address, credentials)


def _list_models(channel, **kwargs):
    from pipeserve.v1 import model_pb2, model_pb2_grpc

    return model_pb2_grpc.ModelServiceStub(channel).ListModels(model_pb2.ListModelsRequest(), timeout=10, **kwargs)


# ---- TLS and mutual TLS -------------------------------------------------------------------------
def test_tls_serves_trusting_clients_and_refuses_plaintext_and_other_cas(pki):
    server = make_server(tls_cert=str(pki["server"]), tls_key=str(pki["server_key"]))
    try:
        with _secure_channel(server.address, pki) as channel:
            assert _list_models(channel).models == []
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        # A plaintext client cannot talk to a TLS listener.
        with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as plain:
            _list_models(channel)
        assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
        # A client that trusts another CA refuses the server's certificate.
        with _secure_channel(server.address, pki, root="rogue_ca") as channel, \
                pytest.raises(grpc.RpcError) as untrusted:
            _list_models(channel)
        assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_mutual_tls_needs_a_client_certificate_from_the_configured_ca(pki):
    server = make_server(tls_cert=str(pki["server"]), tls_key=str(pki["server_key"]), tls_client_ca=str(pki["ca"]))
    try:
        with _secure_channel(server.address, pki, client="client") as channel:
            assert _list_models(channel).models == []
        with _secure_channel(server.address, pki) as channel, pytest.raises(grpc.RpcError) as anonymous:
            _list_models(channel)
        assert anonymous.value.code() == grpc.StatusCode.UNAVAILABLE
        with _secure_channel(server.address, pki, client="rogue") as channel, pytest.raises(grpc.RpcError) as rogue:
            _list_models(channel)
        assert rogue.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_tls_settings_must_be_complete(pki):
    from pipeserve.config import Settings
    from pipeserve.serving.security import server_credentials

    assert server_credentials(Settings()) is None
    with pytest.raises(SystemExit, match="tls_cert and tls_key"):
        server_credentials(Settings(tls_cert=str(pki["server"])))
    with pytest.raises(SystemExit, match="cannot read tls_key"):
        server_credentials(Settings(tls_cert=str(pki["server"]), tls_key="/nonexistent/key.pem"))


# ---- bearer tokens ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    return build_tiny_vit(tmp_path_factory.mktemp("security_vit"))


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    admin_file = tmp_path_factory.mktemp("tokens") / "admin"
    admin_file.write_text("# admin tokens, one per line\nadmin-secret\n\n")
    server = make_server(auth_tokens=("user-secret", "user-2"), admin_tokens=(f"file:{admin_file}",))
    yield server
    server.stop()


def _bearer(token: str):
    return (("authorization", f"Bearer {token}"),)


def test_calls_without_a_known_token_are_unauthenticated(token_server):
    from pipeserve.v1 import image_classification_pb2_grpc

    channel = token_server.channel
    for metadata in [(), _bearer("wrong"), _bearer(""), (("authorization", "Basic dXNlcjpwYXNz"),),
                     _bearer("user-secret-but-longer"), _bearer("user-secre")]:
        with pytest.raises(grpc.RpcError) as error:
            _list_models(channel, metadata=metadata)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
        assert error_reason(error.value) == "UNAUTHENTICATED"
    images = image_classification_pb2_grpc.ImageClassificationServiceStub(channel)
    with pytest.raises(grpc.RpcError) as error:
        images.ClassifyImage(classify_request(), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "bearer token" in error.value.details()


def test_health_and_reflection_stay_open(token_server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    status = health_pb2_grpc.HealthStub(token_server.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(token_server.channel)
    responses = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                               timeout=10))
    names = {s.name for s in responses[0].list_services_response.service}
    assert "pipeserve.v1.ModelService" in names and "grpc.health.v1.Health" in names


def test_user_tokens_call_tasks_and_read_models_but_only_admins_write(token_server, vit_dir):
    from pipeserve.v1 import image_classification_pb2_grpc, model_pb2, model_pb2_grpc

    models = model_pb2_grpc.ModelServiceStub(token_server.channel)
    images = image_classification_pb2_grpc.ImageClassificationServiceStub(token_server.channel)
    user, admin = _bearer("user-secret"), _bearer("admin-secret")

    assert _list_models(token_server.channel, metadata=_bearer("user-2")).models == []
    for write, request in [(models.LoadModel, model_pb2.LoadModelRequest(model=str(vit_dir))),
                           (models.UnloadModel, model_pb2.UnloadModelRequest(model=str(vit_dir)))]:
        with pytest.raises(grpc.RpcError) as denied:
            write(request, timeout=60, metadata=user)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_reason(denied.value) == "PERMISSION_DENIED"
        assert "admin token" in denied.value.details()
    # The user's call got past authentication to the servicer: no model yet.
    with pytest.raises(grpc.RpcError) as missing:
        images.ClassifyImage(classify_request(), timeout=10, metadata=user)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    loaded = models.LoadModel(model_pb2.LoadModelRequest(model=str(vit_dir)), timeout=120, metadata=admin).model
    assert loaded.state == model_pb2.MODEL_STATE_READY
    response = images.ClassifyImage(classify_request(request_id="tok-1"), timeout=30, metadata=user)
    assert response.request_id == "tok-1" and len(response.labels) == 5
    # An admin token is also a user token.
    assert images.ClassifyImage(classify_request(), timeout=30, metadata=admin).labels
    assert len(models.ListModels(model_pb2.ListModelsRequest(), timeout=10, metadata=user).models) == 1
    models.UnloadModel(model_pb2.UnloadModelRequest(model=str(vit_dir)), timeout=60, metadata=admin)
    assert models.ListModels(model_pb2.ListModelsRequest(), timeout=10, metadata=admin).models == []


def test_token_set_and_token_files(tmp_path):
    from pipeserve.serving.security import TokenSet, bearer_token, load_tokens

    path = tmp_path / "tokens"
    path.write_text("  alpha  \n# comment\n\nbeta\n")
    assert load_tokens(["gamma", f"file:{path}", " "]) == ["gamma", "alpha", "beta"]
    with pytest.raises(SystemExit, match="cannot read token file"):
        load_tokens([f"file:{tmp_path / 'missing'}"])
    tokens = TokenSet(["alpha", "beta"])
    assert "alpha" in tokens and "beta" in tokens
    assert "alph" not in tokens and "alphaa" not in tokens and "" not in tokens and "\udcff" not in tokens
    assert not TokenSet([])
    assert bearer_token((("authorization", "Bearer abc"),)) == "abc"
    assert bearer_token((("authorization", "bearer  abc "),)) == "abc"
    assert bearer_token((("authorization", "Basic abc"),)) == ""
    assert bearer_token(()) == ""


# ---- concurrent streams per client ------------------------------------------------------------
class _FakeContext:
    """The parts of grpc.aio.ServicerContext the security interceptor reads."""

    def __init__(self, metadata=(), peer="ipv4:127.0.0.1:50000"):
        self._metadata, self._peer = metadata, peer

    def invocation_metadata(self):
        return self._metadata

    def peer(self):
        return self._peer


async def test_streams_per_client_are_limited():
    """Drives the interceptor's real wrapper around a server-streaming handler that stays open
    until released: the (limit+1)-th concurrent stream of one client is refused with
    RESOURCE_EXHAUSTED/TOO_MANY_STREAMS, another client (token or address) is not affected, and
    a closed stream frees its slot."""
    from pipeserve.config import Settings
    from pipeserve.serving.security import SecurityInterceptor, TooManyStreams

    release = asyncio.Event()

    async def handler_behaviour(request, context):
        yield "first"
        await release.wait()
        yield "last"

    handler = grpc.unary_stream_rpc_method_handler(handler_behaviour)

    class Details:
        method = "/pipeserve.v1.TextGenerationService/GenerateStream"

    async def continuation(details):
        return handler

    for settings, same, other in [
        (Settings(max_streams_per_client=2), _FakeContext(peer="ipv4:10.0.0.1:1111"),
         _FakeContext(peer="ipv4:10.0.0.2:1111")),
        (Settings(max_streams_per_client=2, auth_tokens=("a", "b")), _FakeContext(_bearer("a")),
         _FakeContext(_bearer("b"))),
    ]:
        release.clear()
        interceptor = SecurityInterceptor(settings)
        wrapped = (await interceptor.intercept_service(continuation, Details())).unary_stream
        open_streams = []
        for _ in range(2):
            stream = wrapped(None, same).__aiter__()
            assert await stream.__anext__() == "first"
            open_streams.append(stream)
        refused = wrapped(None, same).__aiter__()
        with pytest.raises(TooManyStreams) as error:
            await refused.__anext__()
        assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit is 2" in error.value.message
        # Another connection of the same client host counts against the same limit...
        if not settings.auth_tokens:
            with pytest.raises(TooManyStreams):
                await wrapped(None, _FakeContext(peer="ipv4:10.0.0.1:2222")).__aiter__().__anext__()
        # ...another client does not.
        other_stream = wrapped(None, other).__aiter__()
        assert await other_stream.__anext__() == "first"
        release.set()
        for stream in [*open_streams, other_stream]:
            assert [item async for item in stream] == ["last"]
        assert interceptor._streams == {}
        stream = wrapped(None, same).__aiter__()
        assert await stream.__anext__() == "first" and [x async for x in stream] == ["last"]
