"""The server's run-time requirements as setup.py declares them (pyproject's dependencies are
dynamic: setup.py adds pipeserve-client pinned to the version), read without running setup()."""
from __future__ import annotations

import ast
from pathlib import Path

SETUP = Path(__file__).resolve().parents[1] / "setup.py"


def runtime() -> list[str]:
    """setup.py's RUNTIME list: every run-time requirement but the pipeserve-client pin."""
    for node in ast.walk(ast.parse(SETUP.read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "RUNTIME" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError(f"{SETUP} defines no RUNTIME list")
