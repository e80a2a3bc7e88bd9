"""While the compute lanes work, freed activations stay in the C heap for the next pass (a fresh
mapping per activation faulted its pages in again every pass: 10-15 % of a transcription's CPU
time); once the lanes are idle the server's mmap threshold comes back and the free pages leave
(runtime/manager.py registers the hooks of scheduling/compute.set_activity_hooks)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

_SCRIPT = """
import time, torch
from pathlib import Path
from pipeserve.config import Settings
from pipeserve.runtime.manager import ModelManager
from pipeserve.scheduling import compute

rss = lambda: int(next(l for l in Path('/proc/self/status').read_text().splitlines()
                       if l.startswith('VmRSS')).split()[1]) // 1024
lane = compute.install()
ModelManager(Settings())  # the server's heap policy: 256 KiB threshold, kept while busy
before = rss()

def activations():
    blocks = [torch.ones(256 * 1024) for _ in range(96)]  # 96 activations of 1 MiB, touched
    del blocks
    return rss() - before

kept_busy = lane.call(activations)
time.sleep(compute.IDLE_AFTER_S + 1.0)
print(kept_busy, rss() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_freed_activations_stay_while_the_lanes_work_and_leave_once_idle():
    from pipeserve.runtime.heap import _libc

    if _libc() is None:
        pytest.skip("not glibc")
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120,
                         env={**os.environ})
    assert out.returncode == 0, out.stderr[-2000:]
    kept_busy, kept_idle = map(int, out.stdout.split())
    assert kept_busy > 64  # of the 96 MiB freed: on the heap, for the next pass
    assert kept_idle < 16  # returned once the lanes were idle
