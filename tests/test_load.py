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


def test_overload_past_max_queue_is_refused_only_with_queue_full_and_memory_returns(tmp_path):
    """Every task, the three speech-recognition calls (unary, server-streamed, live) included,
    past a queue bound of 2: the refusals are RESOURCE_EXHAUSTED / QUEUE_FULL only, answered at
    once, every task still completes calls, and the server's RSS returns to its baseline.
    (Before speech recognition was admitted through a bounded queue, its calls queued without
    bound and it had no refusals at all: 16 callers, most of them inside 1-second
    transcriptions, against 2 running + 2 waiting slots leave no room for that.)"""
    sys.path.insert(0, str(ROOT / "bench" / "load"))
    try:
        import run as load_bench
    finally:
        sys.path.remove(str(ROOT / "bench" / "load"))
    # Speech admits asr_max_batch_rows calls at once (their windows batch together): 2 here too.
    report = load_bench.main(["--clients", "16", "--duration", "5", "--max-queue", "2", "--max-batch-size", "2",
                              "--asr-max-batch-rows", "2", "--max-new-tokens", "4", "--settle", "2",
                              "--out", str(tmp_path)])
    assert report["refusals"]["only_queue_full"], report["refusals"]
    for task in load_bench.TASKS:
        row = report["results"][task]
        assert row["calls"] > 0, (task, row)
        if row["refusal_p99_ms"] is not None:
            assert row["refusal_p99_ms"] < 5000, (task, row)  # refused at once, not after queueing
    speech_refusals = sum(report["results"][t]["errors"].get(load_bench.QUEUE_FULL, 0) for t in load_bench.SPEECH_TASKS)
    assert speech_refusals > 0, report["results"]
    assert report["memory"]["returned_to_baseline"], report["memory"]
