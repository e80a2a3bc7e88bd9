"""The load bench, short: concurrent clients across two tasks for a few seconds against a real
server process on 127.0.0.1 get no errors below the queue bound, the server batches their
calls, and its memory returns to the post-warm-up baseline."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


def test_short_load_run_has_no_errors_and_memory_returns(tmp_path):
    sys.path.insert(0, str(ROOT / "bench" / "load"))
    try:
        import run as load_bench
    finally:
        sys.path.remove(str(ROOT / "bench" / "load"))
    report = load_bench.main(["--clients", "6", "--duration", "4", "--tasks", "image-classification,text-generation",
                              "--settle", "2", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "results.json").read_text()) == report
    assert "| image-classification |" in (tmp_path / "results.md").read_text()
    overall = report["results"]["all"]
    assert overall["errors"] == {} and overall["calls"] > 20
    for task in ("image-classification", "text-generation"):
        row = report["results"][task]
        assert row["calls"] > 5 and row["errors"] == {} and row["p50_ms"] <= row["p99_ms"]
    # Six callers and one model: the image calls shared batches.
    assert max(report["mean_batch_size"].values()) > 1.0
    assert report["memory"]["returned_to_baseline"], report["memory"]
