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


@pytest.fixture(scope="session")
def grpc_server():
    """One server for the whole session, without embedded defaults: tests load the models
    they need through ModelService.LoadModel and address them by name."""
    handle = make_server()
    yield handle
    handle.stop()
