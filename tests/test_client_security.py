"""The Python client and the CLI against the real server with TLS, mutual TLS and bearer
tokens (admin-only model writes), using the test-only certificates in tests/tls."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from client_fakes import TLS_DIR
from client_models import build
from grpc_testing import make_server
from pipeserve_client import (NO_RETRY, Client, PermissionDeniedError, UnauthenticatedError, UnavailableError,
                              cli)

CA, OTHER_CA = str(TLS_DIR / "ca.pem"), str(TLS_DIR / "other_ca.pem")
CERT, KEY = str(TLS_DIR / "client.pem"), str(TLS_DIR / "client.key")


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    directory, _ = build("vit", tmp_path_factory.mktemp("secure_vit"))
    return str(directory)


@pytest.fixture(scope="module")
def secure(vit_dir):
    """TLS with user and admin tokens; the ViT loaded by the admin."""
    handle = make_server(tls_cert=str(TLS_DIR / "server.pem"), tls_key=str(TLS_DIR / "server.key"),
                         auth_tokens=("user-token",), admin_tokens=("admin-token",))
    with Client(handle.address, root_certificates=CA, token="admin-token", timeout=120) as admin:
        admin.models.load(vit_dir)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def mutual():
    handle = make_server(tls_cert=str(TLS_DIR / "server.pem"), tls_key=str(TLS_DIR / "server.key"),
                         tls_client_ca=CA)
    yield handle
    handle.stop()


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_tokens_and_admin_only_model_writes(secure, vit_dir):
    with Client(secure.address, root_certificates=CA, token="user-token", timeout=30) as user:
        assert user.classify_image(_png(), model=vit_dir, top_k=1).labels
        assert vit_dir in [m.name for m in user.models.list()]
        with pytest.raises(PermissionDeniedError):
            user.models.unload(vit_dir)
    with Client(secure.address, root_certificates=CA, timeout=30) as anonymous:
        with pytest.raises(UnauthenticatedError):
            anonymous.models.list()
    with Client(secure.address, root_certificates=CA, token="wrong", timeout=30) as wrong:
        with pytest.raises(UnauthenticatedError):
            wrong.classify_image(_png(), model=vit_dir)


def test_tls_trust_is_checked(secure):
    with Client(secure.address, root_certificates=OTHER_CA, token="user-token", retry=NO_RETRY, timeout=10) as c:
        with pytest.raises(UnavailableError):
            c.models.list()
    with Client(secure.address, token="user-token", retry=NO_RETRY, timeout=10) as plaintext:
        with pytest.raises(UnavailableError):
            plaintext.models.list()


def test_mutual_tls(mutual):
    with Client(mutual.address, root_certificates=CA, client_certificate=CERT, client_key=KEY, timeout=30) as c:
        assert isinstance(c.models.list(), list)  # the handshake with a client certificate succeeded
    with Client(mutual.address, root_certificates=CA, retry=NO_RETRY, timeout=10) as no_cert:
        with pytest.raises(UnavailableError):
            no_cert.models.list()


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_cli_with_tls_and_tokens(capsys, secure, mutual, vit_dir, tmp_path, monkeypatch):
    photo = tmp_path / "photo.png"
    photo.write_bytes(_png())
    server = ["--server", secure.address, "--ca-cert", CA]
    code, out, _ = _run(capsys, *server, "--token", "user-token", "classify-image", str(photo), "--model", vit_dir)
    assert code == 0 and out.startswith("class_")
    code, _, err = _run(capsys, *server, "--token", "user-token", "models", "unload", vit_dir)
    assert code == cli.EXIT_REJECTED and "PERMISSION_DENIED" in err
    code, _, err = _run(capsys, *server, "models", "list")
    assert code == cli.EXIT_REJECTED and "UNAUTHENTICATED" in err
    monkeypatch.setenv("PIPESERVE_TOKEN", "user-token")
    code, out, _ = _run(capsys, *server, "models", "list")
    assert code == 0 and vit_dir in out
    code, _, err = _run(capsys, "--server", secure.address, "models", "list")  # no --ca-cert: plaintext
    assert code == cli.EXIT_UNREACHABLE and "--tls" in err
    code, out, _ = _run(capsys, "--server", mutual.address, "--ca-cert", CA, "--cert", CERT, "--key", KEY,
                        "models", "list")
    assert code == 0
    code, _, err = _run(capsys, "--server", mutual.address, "--ca-cert", CA, "--no-retry", "models", "list")
    assert code == cli.EXIT_UNREACHABLE and "--cert/--key" in err
