"""The Node.js client's own tests (clients/node/test, `npm test` = `node --test`) against a
real server and the scripted one, run from pytest so the single test command covers them,
plus its JSDoc type check."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).resolve().parents[1] / "clients" / "node"


def _npm_install() -> None:
    """`npm ci` from the lockfile (once; node_modules is kept between runs)."""
    lock = NODE_DIR / "package-lock.json"
    stamp = NODE_DIR / "node_modules" / ".package-lock.json"
    if stamp.exists() and stamp.stat().st_mtime >= lock.stat().st_mtime:
        return
    done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def node_ready():
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are required (Debian: apt-get install nodejs npm; Node >= 18)")
    _npm_install()


def test_node_client_against_a_live_server(node_ready):
    env = {**os.environ, "PIPESERVE_PYTHON": sys.executable}
    done = subprocess.run(["npm", "test", "--silent"], cwd=NODE_DIR, env=env,
                          capture_output=True, text=True, timeout=900)
    summary = [line for line in done.stdout.splitlines() if line.startswith(("# pass", "# fail", "# skipped"))]
    assert done.returncode == 0, f"node --test failed:\n{done.stdout[-8000:]}\n{done.stderr[-4000:]}"
    assert "# fail 0" in summary and any(line.startswith("# pass") and line != "# pass 0" for line in summary)


def test_node_client_type_checks(node_ready):
    """The JSDoc types of src/ and examples/, against the message types generated from the
    protos (`npm run typecheck` generates src/messages.d.ts first)."""
    done = subprocess.run(["npm", "run", "--silent", "typecheck"], cwd=NODE_DIR, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
