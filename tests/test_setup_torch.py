"""scripts/torch_choice.py (the torch step of scripts/setup) picks the build that fits the
machine, without network: a fake `pip` on PATH reports the configuration (what `pip config
list` prints), a fake `nvidia-smi` reports a GPU or fails as it does without a driver, and
local wheel folders hold fake torch wheels (only their names and METADATA are read)."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.tags import sys_tags

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "torch_choice.py"
VERSION = "2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
NO_DRIVER = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", 9)
ONE_GPU = ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000000)", 0)


def _wheel(folder: Path, local_label: str = "", requires: tuple[str, ...] = ()) -> Path:
    """A fake torch wheel installable on this interpreter: a name with this Python's first tag
    and a METADATA with the given requirements."""
    tag = next(iter(sys_tags()))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"torch-{VERSION}{local_label}-{tag.interpreter}-{tag.abi}-{tag.platform}.whl"
    metadata = f"Metadata-Version: 2.1\nName: torch\nVersion: {VERSION}{local_label}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"torch-{VERSION}.dist-info/METADATA", metadata)
    return path


def _choose(tmp_path: Path, config: list[str], nvidia_smi: tuple[str, int] | None) -> tuple[list[str], str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    config_file = tmp_path / "pip-config.txt"
    config_file.write_text("".join(line + "\n" for line in config))
    fake_pip = bin_dir / "pip"
    fake_pip.write_text(f'#!/bin/sh\n[ "$1 $2" = "config list" ] || exit 3\ncat "{config_file}"\n')
    fake_pip.chmod(0o755)
    if nvidia_smi is not None:
        text, status = nvidia_smi
        smi = bin_dir / "nvidia-smi"
        smi.write_text(f"#!/bin/sh\necho '{text}'\nexit {status}\n")
        smi.chmod(0o755)
    # Only the fakes and the basic tools: a real nvidia-smi elsewhere on PATH must not answer.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP")}
    env["PATH"] = os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"])
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split(), done.stderr


def test_gpu_present_takes_the_cuda_build_from_the_configured_index(tmp_path):
    args, log = _choose(tmp_path, ["global.index-url='https://pypi.org/simple'"], ONE_GPU)
    assert args == [f"torch=={VERSION}"]
    assert "CUDA build" in log and "NVIDIA GPU is present" in log


def test_gpu_present_passes_over_a_local_cpu_wheel(tmp_path):
    cpu = _wheel(tmp_path / "wheels", "+cpu")
    args, log = _choose(tmp_path, [f"global.find-links='{cpu.parent}'"], ONE_GPU)
    # === compares the version text exactly: 2.13.0+cpu, which pip ranks above 2.13.0, is out.
    assert args == [f"torch==={VERSION}"]
    assert "CUDA build" in log and str(cpu) in log


@pytest.mark.parametrize("where", ["find-links", "env-find-links", "file-index"])
def test_no_gpu_with_a_local_cpu_wheel_keeps_the_plain_line(tmp_path, where):
    if where == "file-index":
        # A file:// simple index whose torch page links a wheel without a +cpu label: its
        # metadata requires no nvidia-* package, so it is a CPU build.
        index = tmp_path / "simple"
        wheel = _wheel(tmp_path / "files")
        (index / "torch").mkdir(parents=True)
        (index / "torch" / "index.html").write_text(
            f'<html><body><a href="../../files/{wheel.name}#sha256=00">{wheel.name}</a></body></html>')
        config = [f"global.extra-index-url='file://{index} https://example.invalid/simple'"]
    else:
        wheel = _wheel(tmp_path / "wheels", "+cpu")
        key = ":env:.find-links" if where == "env-find-links" else "global.find-links"
        config = [f"global.cert='/etc/ssl/certs/ca-certificates.crt'", f"{key}='{wheel.parent}'"]
    args, log = _choose(tmp_path, config, NO_DRIVER)
    assert args == [f"torch=={VERSION}"]
    assert "CPU build" in log and str(wheel) in log


def test_no_gpu_public_index_only_takes_the_cpu_index(tmp_path):
    args, log = _choose(tmp_path, ["global.index-url='https://pypi.org/simple'"], None)
    assert args == [f"torch=={VERSION}+cpu", "--extra-index-url", CPU_INDEX]
    assert "CPU build" in log and CPU_INDEX in log


def test_no_gpu_and_only_a_local_cuda_wheel_takes_the_cpu_index(tmp_path):
    # A local folder holding the public index's CUDA wheel (it requires nvidia-* packages) is
    # not a CPU wheel: installing the plain line from it would pull the nvidia packages.
    cuda = _wheel(tmp_path / "wheels", requires=("nvidia-cublas-cu12==12.8.4.1; platform_system == 'Linux'",))
    args, log = _choose(tmp_path, [f"global.find-links='{cuda.parent}'"], NO_DRIVER)
    assert args == [f"torch=={VERSION}+cpu", "--extra-index-url", CPU_INDEX]
    assert "no local CPU wheel" in log


def test_a_wheel_for_another_python_is_not_a_local_cpu_wheel(tmp_path):
    folder = tmp_path / "wheels"
    folder.mkdir()
    foreign = folder / f"torch-{VERSION}+cpu-cp27-cp27mu-manylinux1_x86_64.whl"
    with zipfile.ZipFile(foreign, "w") as archive:
        archive.writestr(f"torch-{VERSION}.dist-info/METADATA", f"Name: torch\nVersion: {VERSION}+cpu\n")
    args, _ = _choose(tmp_path, [f"global.find-links='{folder}'"], NO_DRIVER)
    assert args[0] == f"torch=={VERSION}+cpu"


def test_setup_installs_what_the_choice_prints():
    # scripts/setup runs the choice with the venv's pip and installs exactly its arguments.
    setup = (ROOT / "scripts" / "setup").read_text()
    assert 'mapfile -t TORCH_ARGS < <(PIP=".venv/bin/python -m pip" .venv/bin/python scripts/torch_choice.py)' in setup
    assert 'pip_install "${TORCH_ARGS[@]}"' in setup
