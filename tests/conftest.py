"""Shared fixtures. Helpers live in grpc_testing.py and harness.py (importable by tests)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT / "service", ROOT / "clients" / "python", ROOT / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from grpc_testing import make_server  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a CUDA GPU: where torch sees none, they skip with that reason
    (the one platform skip expected on CPU-only machines; scripts/gpu-check runs them)."""
    cuda_items = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is false); "
                                   "run scripts/gpu-check on a GPU machine")
    for item in cuda_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def grpc_server():
    """One server for the whole session, without embedded defaults: tests load the models
    they need through ModelService.LoadModel and address them by name."""
    handle = make_server()
    yield handle
    handle.stop()


# In CI (CI=true) a skipped test is a failure: a missing package, binary (espeak-ng) or module
# must not silently switch a group of tests off. Only the platform skips we expect are exempt:
# tests marked `cuda` (no GPU on the CI runners). Expected failures (xfail) are not skips.
EXPECTED_SKIP_MARKERS = ("cuda",)


def _skips_are_failures() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipping it in CI is expected")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (_skips_are_failures() and report.skipped and not hasattr(report, "wasxfail")
            and not any(item.get_closest_marker(name) for name in EXPECTED_SKIP_MARKERS)):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (CI=true), which counts as a failure: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if _skips_are_failures() and report.skipped:  # a module-level importorskip / skip
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{collector.nodeid} skipped in CI (CI=true), which counts as a failure: {reason}"


@pytest.fixture(autouse=True)
def _no_leaked_torch_mode():
    """A test must leave the main thread's autograd state as it found it: a generator closed
    on the wrong thread once left it in the compute lane's inference mode, and every later
    test that read a weight's version counter failed far from the cause."""
    yield
    import torch

    leaked = torch.is_inference_mode_enabled() or not torch.is_grad_enabled()
    if leaked:
        torch.set_grad_enabled(True)
        pytest.fail(f"this test left inference mode {torch.is_inference_mode_enabled()}, "
                    f"grad mode {torch.is_grad_enabled()} on the main thread", pytrace=False)
