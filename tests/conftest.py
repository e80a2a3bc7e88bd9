"""Shared fixtures. Helpers live in grpc_testing.py and harness.py (importable by tests)."""
from __future__ import annotations

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
