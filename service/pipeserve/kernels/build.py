"""Compiles the kernels' C++ (every .cpp here) into one shared library in the cache.

A direct g++ call with torch's include paths and only the ATen / torch-library headers (no
pybind11, no torch/extension.h: ~10 s on 2 cores instead of a minute), -O3 -march=native (the
library is built on the machine that runs it), -ffp-contract=off (the portable path's sums are
what its source says, whatever the compiler inlines), -fopenmp for the kernel's own OpenMP
region (parallel.h parallel_chunks, on the calling thread's team) with libgomp resolved to
torch's own copy (the same soname, already loaded: one OpenMP runtime in the process). The
file lands in <cache>/kernels/ under a name keyed by the sources and headers, the flags, the
torch version and ABI, and the CPU's feature flags, so a changed source, torch
upgrade or another CPU gets its own build; writes are atomic (temporary file, then rename).

    python -m pipeserve.kernels.build      # scripts/setup runs this after the install
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..checkpoints.gguf_cache import cache_dir

# Every .cpp here is compiled into the one library; headers only count toward the cache key.
SOURCES = sorted(Path(__file__).parent.glob("*.cpp"))
HEADERS = sorted(Path(__file__).parent.glob("*.h"))
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-std=c++20", "-shared", "-fPIC", "-w")
# Compiling takes ~10 s on an idle core; a wedged compiler must not hang setup or a test session.
TIMEOUT_S = 600


class BuildFailed(RuntimeError):
    """The compiler is there but did not produce the library (its message is the reason)."""


def compiler() -> str | None:
    """The C++ compiler to use ($CXX, else g++) if it is installed."""
    return shutil.which(os.environ.get("CXX", "g++"))


def cpu_flags() -> str:
    """The CPU's feature flags (/proc/cpuinfo), or the machine type where there is none: what
    -march=native compiles for."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.machine()


def cache_key() -> str:
    """Hex digest of everything the library's bits depend on: sources, flags, torch, CPU."""
    import torch

    digest = hashlib.sha256()
    sources = (path.read_bytes() for path in SOURCES + HEADERS)
    for part in (*sources, " ".join(FLAGS).encode(), torch.__version__.encode(),
                 str(torch._C._GLIBCXX_USE_CXX11_ABI).encode(), cpu_flags().encode()):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


def library_path() -> Path:
    """Where this source, torch and CPU's library is (or would be) built."""
    return cache_dir() / "kernels" / f"pipeserve_kernels-{cache_key()[:32]}.so"


def command(output: Path) -> list[str]:
    """The compiler call that builds the library into `output`."""
    import torch
    from torch.utils.cpp_extension import include_paths

    torch_lib = Path(torch.__file__).parent / "lib"
    # the wheel's own libgomp where it ships one; a torch linked to the system's gets that one
    openmp = "-l:libgomp.so.1" if (torch_lib / "libgomp.so.1").exists() else "-lgomp"
    return [compiler() or "g++", *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            *(f"-I{path}" for path in include_paths()), *map(str, SOURCES), "-o", str(output),
            f"-L{torch_lib}", "-lc10", "-ltorch_cpu", openmp, f"-Wl,-rpath,{torch_lib}"]


def build(force: bool = False) -> Path:
    """The library's path, compiling it first unless it is cached (or `force`). Raises
    BuildFailed with the compiler's message, FileNotFoundError where there is no compiler."""
    target = library_path()
    if target.exists() and not force:
        return target
    if compiler() is None:
        names = ", ".join(path.name for path in SOURCES)
        raise FileNotFoundError(f"no C++ compiler ({os.environ.get('CXX', 'g++')}) to build {names}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".building-", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run(command(Path(temporary)), capture_output=True, text=True, timeout=TIMEOUT_S)
        if done.returncode:
            raise BuildFailed(f"{compiler()} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


def main() -> int:
    try:
        print(build())
    except (BuildFailed, FileNotFoundError, subprocess.TimeoutExpired) as exc:
        print(f"pipeserve kernels not built: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
