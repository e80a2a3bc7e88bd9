"""The GPU check's dry run passes on a CPU machine, lists its steps and says what to fetch
instead of crashing when the carried wheels are absent; the wheel bookkeeping it relies on."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "gpu"))

import wheels  # noqa: E402


def _dry_run(tmp_path, *extra):
    result = subprocess.run([str(ROOT / "scripts" / "gpu-check"), "--dry-run", "--out", str(tmp_path / "out"), *extra],
                            capture_output=True, text=True, timeout=300)
    return result, json.loads((tmp_path / "out" / "report.json").read_text())


def test_dry_run_without_carried_wheels_lists_what_to_fetch(tmp_path):
    empty = tmp_path / "no-wheels"
    result, report = _dry_run(tmp_path, "--wheels", str(empty))
    assert result.returncode == 0, result.stdout + result.stderr
    assert [s["step"] for s in report["steps"]] == ["environment", "wheels", "codegen", "tests", "benches"]
    wheels_step = next(s for s in report["steps"] if s["step"] == "wheels")
    assert wheels_step["fetch"] == [f"{w.dist}=={w.version}" for w in wheels.WHEELS]
    assert "scripts/gpu-wheels" in wheels_step["detail"]
    assert "--only-binary=:all:" in report["wheels"]["download"] and "--python-version 3.12" in report["wheels"]["download"]
    tests_step = next(s for s in report["steps"] if s["step"] == "tests")
    assert "tests/test_cuda.py" in tests_step["detail"] and "-m cuda" in tests_step["detail"]
    assert (tmp_path / "out" / "report.md").read_text().startswith("# GPU check")


def test_dry_run_with_carried_wheels_finds_each_one(tmp_path):
    folder = tmp_path / "whl"
    folder.mkdir()
    for w in wheels.WHEELS:  # empty files with the names pip download gives them
        (folder / f"{w.filename_prefix}cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl").write_bytes(b"")
    (folder / "stray-1.0-cp311-cp311-manylinux_2_17_x86_64.whl").write_bytes(b"")
    result, report = _dry_run(tmp_path, "--wheels", str(folder))
    assert result.returncode == 0, result.stdout + result.stderr
    assert report["wheels"]["missing"] == []
    assert "every wheel is present" in result.stdout


def test_a_python_311_wheel_does_not_count_for_312(tmp_path):
    grpc = next(w for w in wheels.WHEELS if w.dist == "grpcio")
    (tmp_path / f"{grpc.filename_prefix}cp311-cp311-manylinux2014_x86_64.whl").write_bytes(b"")
    assert wheels.find_wheel(tmp_path, grpc) is None
    (tmp_path / f"{grpc.filename_prefix}cp312-cp312-manylinux2014_x86_64.whl").write_bytes(b"")
    assert wheels.find_wheel(tmp_path, grpc) is not None
    protobuf = next(w for w in wheels.WHEELS if w.dist == "protobuf")
    (tmp_path / f"{protobuf.filename_prefix}cp310-abi3-manylinux2014_x86_64.whl").write_bytes(b"")
    assert wheels.find_wheel(tmp_path, protobuf) is not None  # abi3 from 3.10 serves 3.12


def test_needed_installs_the_grpc_set_together():
    installed = {w.dist: w.version for w in wheels.WHEELS}
    assert wheels.needed(installed) == []
    installed["grpcio-status"] = None  # one member missing: the whole set, generated code included
    assert {w.dist for w in wheels.needed(installed)} == {w.dist for w in wheels.WHEELS if w.group == "grpc"}
    installed = {w.dist: w.version for w in wheels.WHEELS}
    installed["soundfile"] = "0.11.0"  # older than pyproject's lower bound
    assert [w.dist for w in wheels.needed(installed)] == ["soundfile"]


def test_carried_wheel_list_matches_pyproject_dependencies():
    """Every run-time dependency but torch and numpy (the image's, with transformers) is carried."""
    import server_requirements

    deps = server_requirements.runtime()
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower().replace("_", "-") for d in deps}
    carried = {w.dist.lower() for w in wheels.WHEELS}
    assert names - carried == {"torch", "numpy", "huggingface-hub", "tokenizers"}, names - carried


def test_cuda_image_installs_the_checked_versions():
    """deploy/Dockerfile.cuda pins pipeserve's dependencies to the GPU check's wheel versions."""
    dockerfile = (ROOT / "deploy" / "Dockerfile.cuda").read_text()
    assert "COPY bench/gpu/wheels.py" in dockerfile
    assert "--constraints > /tmp/gpu-constraints.txt" in dockerfile
    assert "pip install -c /tmp/gpu-constraints.txt ./clients/python ." in dockerfile
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu" / "wheels.py"), "--constraints"],
                            capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == [f"{w.dist}=={w.version}" for w in wheels.WHEELS]


def test_model_pieces_are_laid_out_per_call_and_joined_back(tmp_path):
    import carry

    big, small = tmp_path / "big-1.0-py3-none-any.whl", tmp_path / "small-1.0-py3-none-any.whl"
    big.write_bytes(bytes(range(256)) * 10)  # 2560 bytes
    small.write_bytes(b"x" * 600)
    root = tmp_path / "carry"
    folders = carry.lay_out([big, small], root, piece=1000)
    assert folders == 4  # 3160 bytes fill 3 folders and part of a fourth: no folder half empty
    sizes = [sum(p.stat().st_size for p in (root / str(i)).glob("*.part*")) for i in range(1, 5)]
    assert sizes == [1000, 1000, 1000, 160]
    with pytest.raises(FileNotFoundError, match="big-1.0-py3-none-any.whl: 2 of 3 pieces"):
        moved = next((root / "3").glob("big*.part*"))  # a folder not carried yet
        hidden = moved.rename(tmp_path / moved.name)
        carry.reassemble(tmp_path / "joined", root)
    hidden.rename(moved)
    joined = carry.reassemble(tmp_path / "joined", root)
    assert [p.read_bytes() for p in joined] == [big.read_bytes(), small.read_bytes()]
    next((root / "1").glob("big*.part00")).write_bytes(b"\0" * 1000)  # a corrupted piece
    with pytest.raises(FileNotFoundError, match="sha256 mismatch"):
        carry.reassemble(tmp_path / "joined", root)


def test_install_puts_a_wheel_in_the_target_without_an_index(tmp_path):
    import zipfile

    wheel = tmp_path / "demo_pkg-1.0-py3-none-any.whl"
    files = {"demo_pkg/__init__.py": "VALUE = 42\n",
             "demo_pkg-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n",
             "demo_pkg-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files["demo_pkg-1.0.dist-info/RECORD"] = "".join(f"{name},,\n" for name in files) + "demo_pkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    target = tmp_path / "site"
    assert "1 wheels" in wheels.install([wheel], target)
    result = subprocess.run([sys.executable, "-c", "import demo_pkg; print(demo_pkg.VALUE)"],
                            env={"PYTHONPATH": str(target)}, capture_output=True, text=True)
    assert result.stdout.strip() == "42", result.stderr
