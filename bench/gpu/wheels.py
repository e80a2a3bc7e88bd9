"""The wheels a GPU machine may lack, how to fetch them beforehand, and how to install them there.

The GPU machine this check targets has CUDA torch and transformers preinstalled (Python 3.12),
no package index, and room for about 64 MiB of carried files. transformers already brings
numpy, safetensors, tokenizers and huggingface_hub; the server's other imports (pyproject's
dependencies) and the test runner may not be there. (The device image seen in 2026-11 has
grpcio, protobuf, pillow, prometheus-client, pytest and pytest-timeout, and lacks grpcio-tools,
the grpc health/reflection/status packages, soundfile, cffi and pytest-asyncio.) So the carried folder holds exactly the
wheels below, pinned to the versions this repository is tested with, for CPython 3.12 on
manylinux x86_64; `scripts/gpu-wheels` downloads them (and `download_command()` says how by hand).

Installing: a wheel goes into a private folder (`--target`, prepended to PYTHONPATH) only when
its import is missing or older than the server needs; the image's own packages stay untouched.
The gRPC/protobuf set is one unit: the generated code (`pipeserve.codegen`) must be compiled by
the same grpcio-tools whose protobuf runtime loads it, so if any member is missing or too old,
all of them are installed together from the carried wheels and shadow the image's copies.
"""
from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
ABIS = ("cp312", "abi3", "none")
# What one carried call may bring along (the device tool's limit), less room for the repo's
# other untracked files.
CARRY_LIMIT_BYTES = 60 << 20


@dataclass(frozen=True)
class Wheel:
    dist: str  # the distribution name, as pip knows it
    version: str  # the version carried (the one this repository is tested with)
    minimum: str  # the oldest installed version that serves (pyproject's lower bound)
    group: str = ""  # wheels of one group are installed together or not at all

    @property
    def filename_prefix(self) -> str:
        """Wheel file names start with the normalised name and the version (PEP 427)."""
        return f"{re.sub(r'[-_.]+', '_', self.dist).lower()}-{self.version}-"


WHEELS: tuple[Wheel, ...] = (
    # The server's gRPC stack and contracts (pyproject dependencies).
    Wheel("grpcio", "1.85.3", "1.60", group="grpc"),
    Wheel("grpcio-tools", "1.85.1", "1.60", group="grpc"),
    Wheel("grpcio-health-checking", "1.85.1", "1.60", group="grpc"),
    Wheel("grpcio-reflection", "1.85.1", "1.60", group="grpc"),
    Wheel("grpcio-status", "1.85.3", "1.60", group="grpc"),
    Wheel("googleapis-common-protos", "1.76.0", "1.56", group="grpc"),  # google.rpc for grpcio-status
    Wheel("protobuf", "7.36.2", "4.25", group="grpc"),
    # Audio decoding (bundles libsndfile) and its cffi binding.
    Wheel("soundfile", "0.14.0", "0.12"),
    Wheel("cffi", "2.1.1", "1.0"),
    Wheel("pycparser", "3.12", "2.0"),
    Wheel("prometheus-client", "0.26.0", "0.20"),
    # The HTTP/JSON front door (aiohttp and what it imports), chat templates, GGUF checkpoints
    # (gguf's own numpy, pyyaml, tqdm and requests come with transformers).
    Wheel("aiohttp", "3.14.5", "3.9", group="aiohttp"),
    Wheel("aiohappyeyeballs", "2.7.1", "2.5", group="aiohttp"),
    Wheel("aiosignal", "1.4.0", "1.4", group="aiohttp"),
    Wheel("attrs", "26.1.0", "17.3", group="aiohttp"),
    Wheel("frozenlist", "1.8.0", "1.1", group="aiohttp"),
    Wheel("multidict", "7.2.1", "4.5", group="aiohttp"),
    Wheel("propcache", "0.5.4", "0.2", group="aiohttp"),
    Wheel("yarl", "1.25.1", "1.17", group="aiohttp"),
    Wheel("jinja2", "3.1.6", "3.1.6"),
    Wheel("markupsafe", "3.0.4", "2.0"),
    Wheel("gguf", "0.19.0", "0.17"),
    # Usually present with transformers; carried because the server imports them directly.
    Wheel("safetensors", "0.8.0", "0.4"),
    Wheel("pillow", "13.0.0", "10"),
    # The test runner (pyproject's test extra; the CUDA tests need nothing else from it).
    Wheel("pytest", "9.2.0", "8"),
    Wheel("pluggy", "1.7.0", "1.5"),
    Wheel("iniconfig", "2.3.1", "1.0"),
    Wheel("pygments", "2.21.0", "2.7"),
    Wheel("pytest-asyncio", "1.5.0", "0.23"),
    Wheel("pytest-timeout", "2.4.0", "2.2"),
)


def download_command(dest: Path | str = ".whl", python: str = "python3") -> list[str]:
    """The `pip download` that fetches every carried wheel for Python 3.12 manylinux x86_64."""
    command = [python, "-m", "pip", "download", "--only-binary=:all:", "--no-deps",
               "--python-version", PYTHON_VERSION, "--implementation", "cp"]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    for abi in ABIS:
        command += ["--abi", abi]
    command += ["-d", str(dest)]
    command += [f"{w.dist}=={w.version}" for w in WHEELS]
    return command


def find_wheel(folder: Path, wheel: Wheel) -> Path | None:
    if not folder.is_dir():
        return None
    for path in sorted(folder.glob("*.whl")):
        if path.name.lower().startswith(wheel.filename_prefix) and _fits_python312(path.name):
            return path
    return None


def _fits_python312(filename: str) -> bool:
    """A wheel's tags (name-version-python-abi-platform.whl) allow CPython 3.12 on linux x86_64."""
    python_tag, abi_tag, platform_tag = filename[:-len(".whl")].split("-")[-3:]
    pythons = python_tag.split(".")
    python_ok = any(p in ("py3", "py2.py3", "cp312") or (abi_tag == "abi3" and p.startswith("cp3")
                                                          and int(p[3:] or 0) <= 12) for p in pythons)
    platform_ok = platform_tag == "any" or any(p.endswith("x86_64") and ("linux" in p) for p in platform_tag.split("."))
    return python_ok and platform_ok and abi_tag in ("cp312", "abi3", "none")


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def needed(installed: dict[str, str | None] | None = None) -> list[Wheel]:
    """The wheels to install: those missing or older than their minimum, and whole groups of them.
    `installed` maps dist -> version (None = absent); by default read from this interpreter."""
    if installed is None:
        installed = {w.dist: installed_version(w.dist) for w in WHEELS}
    lacking = {w.dist for w in WHEELS
               if installed.get(w.dist) is None or _version_tuple(installed[w.dist]) < _version_tuple(w.minimum)}
    groups = {w.group for w in WHEELS if w.dist in lacking and w.group}
    return [w for w in WHEELS if w.dist in lacking or (w.group and w.group in groups)]


@dataclass
class WheelCheck:
    present: list[Path]
    missing: list[Wheel]
    total_bytes: int

    @property
    def ok(self) -> bool:
        return not self.missing and self.total_bytes <= CARRY_LIMIT_BYTES


def check(folder: Path, wanted: list[Wheel] | None = None) -> WheelCheck:
    """Which of `wanted` (default: all) are in `folder`, and the carried size of the whole list."""
    wanted = list(WHEELS) if wanted is None else wanted
    present, missing = [], []
    for wheel in wanted:
        path = find_wheel(folder, wheel)
        (present if path else missing).append(path or wheel)
    # everything in the folder travels: the wheels and the other carried files (bench/gpu/carry.py)
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0
    return WheelCheck(present, missing, total)


def install(wheels: list[Path], target: Path) -> str:
    """Installs wheel files into `target` without an index or dependency resolution (the list is
    complete by construction). pip when the image has it; otherwise a wheel is a zip whose
    top-level folders import as they are, which is all a --target install does for these."""
    target.mkdir(parents=True, exist_ok=True)
    if not wheels:
        return "nothing to install"
    pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True)
    if pip.returncode == 0:
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                                 "--disable-pip-version-check", "--upgrade", "--target", str(target),
                                 *map(str, wheels)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"pip install failed:\n{result.stdout}\n{result.stderr}")
        return f"pip installed {len(wheels)} wheels into {target}"
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target)
    return f"unpacked {len(wheels)} wheels into {target} (no pip in this image)"


def constraints() -> str:
    """pip constraints pinning every carried wheel's version: deploy/Dockerfile.cuda installs
    pipeserve under them, so the CUDA image runs the versions the GPU check ran."""
    return "".join(f"{w.dist}=={w.version}\n" for w in WHEELS)


if __name__ == "__main__":
    if sys.argv[1:] == ["--constraints"]:
        sys.stdout.write(constraints())
    else:
        print(" ".join(download_command()))
