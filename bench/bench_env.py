"""What every benchmark records beside its numbers, and how it times both sides alike.

environment(): the CPU model (from /proc/cpuinfo, as lscpu shows it), the instruction-set
features the kernels depend on, the machine's load average when the run started, and the exact
versions (Python, torch, transformers, pipeserve's git commit, and any extra packages a bench
uses, such as faster-whisper and ctranslate2). A ratio means little without them: the same
code gave 1.6x on one CPU and a different figure on another.

interleaved_best(): every runner once per round, in turn, for N rounds; each runner's time is
its best round. On a shared machine load comes and goes; alternating spreads it over all
sides instead of favouring whichever ran in a quiet minute, and the minimum is the least
disturbed run.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]

# CPU features that decide which kernels torch/oneDNN and CTranslate2 pick.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_info() -> dict:
    """Model name, family/model/stepping and kernel-relevant flags of the first CPU."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor's block is enough
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    return {
        "cpu_model": fields.get("model name") or platform.processor() or platform.machine(),
        "cpu_family_model_stepping": "/".join(fields.get(k, "?") for k in ("cpu family", "model", "stepping")),
        "cpu_flags": [f for f in KERNEL_FLAGS if f in flags],
        "cpu_count": os.cpu_count(),
    }


def pipeserve_commit() -> str:
    """The checked-out commit, with '+dirty' when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(*extra_packages: str) -> dict:
    """Everything a reader needs to tell which machine and which code produced a result."""
    import torch

    env = cpu_info()
    env.update({
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": package_version("transformers"),
        "pipeserve_commit": pipeserve_commit(),
        "openmp_env": {k: os.environ[k] for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")
                       if k in os.environ},
    })
    for name in extra_packages:
        env[name] = package_version(name)
    return env


def environment_markdown(env: dict) -> str:
    """One paragraph for a results.md."""
    extras = [k for k in env if k not in {"cpu_model", "cpu_family_model_stepping", "cpu_flags", "cpu_count",
                                          "load_average_at_start", "python", "torch", "torch_threads",
                                          "transformers", "pipeserve_commit", "openmp_env"} and env[k]]
    versions = ", ".join([f"torch {env['torch']}", f"transformers {env['transformers']}"]
                         + [f"{k} {env[k]}" for k in extras])
    load = ", ".join(f"{x:.2f}" for x in env["load_average_at_start"])
    return (f"CPU: {env['cpu_model']} (family/model/stepping {env['cpu_family_model_stepping']}; "
            f"{', '.join(env['cpu_flags']) or 'no AVX2'}), {env['cpu_count']} cores visible; load average at "
            f"start {load}. Python {env['python']}, {versions}; pipeserve commit {env['pipeserve_commit']}.")


def print_environment(env: dict) -> None:
    print(environment_markdown(env), flush=True)


def interleaved_best(runners: dict[str, Callable[[], object]], rounds: int,
                     warmup: bool = True) -> tuple[dict[str, dict], dict[str, object]]:
    """Runs every runner once per round, in turn; returns ({name: {"seconds": best, "all_seconds":
    [...]}}, {name: output of its last run}). One untimed call of each first when `warmup`."""
    if warmup:
        for run in runners.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    outputs: dict[str, object] = {}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            outputs[name] = run()
            times[name].append(time.perf_counter() - start)
    return {name: {"seconds": min(t), "all_seconds": [round(x, 4) for x in t]} for name, t in times.items()}, outputs
