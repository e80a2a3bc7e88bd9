"""The client installs without torch (issue 17, item 1): both wheels are built from this
checkout, the pipeserve-client wheel alone goes into a fresh virtualenv (its dependencies from
the configured package index), and that virtualenv's Python, with nothing of this checkout on
its path, calls a live server: a streamed transcription, and an unknown model that comes back
as NOT_FOUND with its reason. `import torch` fails there.

Slow (a minute or two: two wheel builds, a virtualenv, pip resolving grpcio and protobuf)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile

from client_models import loader_fixture, require_servicer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

loaded = loader_fixture()  # loaded(kind) -> model name

# Runs in the fresh virtualenv: what it imported from where, and what the server said.
CALLER = r"""
import json, sys
import pipeserve_client, pipeserve.v1.speech_recognition_pb2 as asr_pb2
from pipeserve_client import Client, NotFoundError
address, model, wav = sys.argv[1:4]
out = {"client_file": pipeserve_client.__file__, "stubs_file": asr_pb2.__file__,
       "version": pipeserve_client.__version__}
with Client(address) as client:
    messages = list(client.transcribe(wav, model=model, stream=True, request_id="venv"))
    out["stream"] = [m.WhichOneof("event") for m in messages]
    out["request_ids"] = sorted({m.request_id for m in messages})
    out["text"] = messages[-1].done.transcription.text
    try:
        client.transcribe(wav, model="no-such-model-anywhere")
    except NotFoundError as error:
        out["error"] = {"type": type(error).__name__, "code": error.code.name, "reason": error.reason}
print(json.dumps(out))
"""


def _clean_env() -> dict[str, str]:
    """The environment without this checkout on the path (conftest and the lead's shell put
    service/ and clients/python/ on PYTHONPATH; the fresh virtualenv must not see them)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def _run(command: list, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=_clean_env(),
                          timeout=600, **kwargs)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    # Offline-friendly: the build backends (setuptools, grpcio-tools) are already in this
    # environment, so no isolated build environment is downloaded.
    out = tmp_path_factory.mktemp("wheels")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out,
          ROOT / "clients" / "python", ROOT], cwd=ROOT)
    built = {p.name.split("-")[0]: p for p in out.glob("*.whl")}
    assert set(built) == {"pipeserve", "pipeserve_client"}, built
    return built


@pytest.fixture(scope="module")
def client_venv(wheels, tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("client-venv") / "venv"
    _run([sys.executable, "-m", "venv", venv])
    python = venv / "bin" / "python"
    _run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheels["pipeserve_client"]])
    return python


def _metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return archive.read(name).decode()


def test_wheels_split_stubs_to_the_client_and_pin_it_from_the_server(wheels):
    from pipeserve_client import __version__

    with zipfile.ZipFile(wheels["pipeserve_client"]) as archive:
        client_files = set(archive.namelist())
    with zipfile.ZipFile(wheels["pipeserve"]) as archive:
        server_files = set(archive.namelist())
    protos = sorted(p.stem for p in (ROOT / "protos" / "pipeserve" / "v1").glob("*.proto"))
    for stem in protos:  # generated while the client wheel was built
        assert {f"pipeserve/v1/{stem}_pb2.py", f"pipeserve/v1/{stem}_pb2_grpc.py"} <= client_files
    # pipeserve/ is the server's package; the client ships only its v1 portion.
    assert "pipeserve/__init__.py" not in client_files and "pipeserve/__init__.py" in server_files
    assert not any(name.startswith("pipeserve/v1/") for name in server_files)
    assert not any(name.startswith("pipeserve_client/") for name in server_files)
    client_meta, server_meta = _metadata(wheels["pipeserve_client"]), _metadata(wheels["pipeserve"])
    assert f"Version: {__version__}\n" in client_meta and f"Version: {__version__}\n" in server_meta
    assert f"Requires-Dist: pipeserve-client=={__version__}\n" in server_meta
    client_requires = [line.split()[1] for line in client_meta.splitlines()
                       if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert sorted(r.split("<")[0].split(">")[0] for r in client_requires) == ["grpcio", "grpcio-status", "protobuf"]
    # grpcio-status is not released for every grpcio patch: it requires the series, not the patch
    status_floor = next(r for r in client_requires if r.startswith("grpcio-status")).split(">=")[1].split(",")[0]
    assert status_floor.count(".") == 1, client_requires
    every_requirement = [line for line in client_meta.splitlines() if line.startswith("Requires-Dist:")]
    assert not [line for line in every_requirement if "torch" in line or "grpcio-tools" in line]


def test_client_wheel_in_a_venv_without_torch_calls_a_live_server(client_venv, grpc_server, loaded, tmp_path):
    require_servicer("speech_recognition")
    from pipeserve_client import Client, __version__
    from wav2vec2_checkpoints import audio

    no_torch = subprocess.run([str(client_venv), "-c", "import torch"], capture_output=True, text=True,
                              env=_clean_env())
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr

    model = loaded("ctc")
    wav = tmp_path / "speech.wav"
    soundfile.write(wav, audio(2.0).astype(np.float32), 16000, subtype="FLOAT")
    done = _run([client_venv, "-c", CALLER, grpc_server.address, model, wav], cwd=tmp_path)
    got = json.loads(done.stdout.strip().splitlines()[-1])

    venv_root = client_venv.parent.parent
    assert Path(got["client_file"]).is_relative_to(venv_root), got["client_file"]
    assert Path(got["stubs_file"]).is_relative_to(venv_root), got["stubs_file"]
    assert got["version"] == __version__
    assert got["stream"][-1] == "done" and got["request_ids"] == ["venv"]
    # The same request through this checkout's client gives the same transcription.
    with Client(grpc_server.address) as client:
        assert got["text"] == client.transcribe(wav, model=model).transcription.text
    assert got["error"] == {"type": "NotFoundError", "code": "NOT_FOUND", "reason": "MODEL_NOT_FOUND"}

    cli = _run([client_venv.parent / "pipeserve", "--version"])
    assert cli.stdout.strip() == f"pipeserve {__version__}"
