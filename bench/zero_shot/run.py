"""Zero-shot classification throughput (premise/hypothesis pairs per second): pipeserve against
transformers.pipeline("zero-shot-classification") on the same random-weight BART NLI checkpoint
(bart-large-mnli's architecture at a smaller size), the same texts and labels, and the same
batch size (pairs per forward pass).

Runs, float32 and the same torch thread count on every side:
- transformers.pipeline(texts, candidate_labels, batch_size=B);
- pipeserve's ZeroShotClassificationPipeline.classify, one caller, one text per call (its
  pairs batched up to B at a time);
- the real gRPC server (in process, real channel, the model loaded through
  ModelService.LoadModel) with `--concurrency` callers, one text per call: the server's
  dynamic batcher merges concurrent callers' pairs into shared forward passes of up to B pairs.
After one warm-up call each, the three run in turn for `--rounds` rounds; each reports its best
round (every round is in the JSON). Results: results.json and results.md in --out, with the CPU
model and exact versions.

    PYTHONPATH=service:tests python bench/zero_shot/run.py --size small --texts 32 --batch-size 16 --concurrency 4 --rounds 5
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "service"), str(ROOT / "tests"), str(ROOT / "clients" / "python"), str(ROOT / "bench")]

from pipeserve.serving.openmp_defaults import apply_openmp_defaults  # noqa: E402

apply_openmp_defaults()  # the server's OpenMP settings, before torch loads (both sides share them)

import torch  # noqa: E402

from bench_env import environment, environment_markdown, interleaved_best, print_environment  # noqa: E402

# tiny is the test shape; small is a 6-layer BART (d_model 256); base is bart-base's shape.
SIZES = {
    "tiny": dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37),
    "small": dict(d_model=256, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024),
    "base": dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                 decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072),
}
LABELS = ["sports", "politics", "cooking", "weather"]
SENTENCES = [
    "I love playing football on weekends with my friends, and we usually win.",
    "The election results were announced today in the capital after a long count.",
    "Slice the onions thinly and fry them slowly in butter until golden.",
    "Heavy rain and strong winds are expected across the north tomorrow morning.",
]


def build_checkpoint(size: str, directory: Path) -> Path:
    from transformers import BartConfig, BartForSequenceClassification

    from zero_shot_docqa_checkpoints import NLI_LABELS, build_bart_nli

    build_bart_nli(directory, model_max_length=256)  # tokenizer (and a tiny model we replace)
    vocab = json.loads((directory / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    config = BartConfig(vocab_size=vocab, max_position_embeddings=256, **SIZES[size],
                        id2label=dict(NLI_LABELS), label2id={v: k for k, v in NLI_LABELS.items()})
    BartForSequenceClassification(config).eval().save_pretrained(directory)
    return directory


def transformers_runner(path: Path, texts: list[str], batch_size: int):
    from transformers import pipeline

    pipe = pipeline("zero-shot-classification", model=str(path), device="cpu")

    def run():
        out = pipe(texts, candidate_labels=LABELS, batch_size=batch_size)
        return [list(zip(r["labels"], r["scores"])) for r in out]
    return run


def pipeline_runner(path: Path, texts: list[str], batch_size: int):
    from harness import load_pipeline
    from pipeserve.pipelines.zero_shot_classification import ZeroShotRequest

    ours = load_pipeline(path)
    ours.max_batch_size = batch_size
    return lambda: [ours.classify([ZeroShotRequest(t, tuple(LABELS))])[0].labels for t in texts]


def grpc_runner(server, pool, path: Path, texts: list[str], batch_sizes: list[int]):
    from grpc_testing import load_model
    from pipeserve.v1 import zero_shot_classification_pb2 as pb, zero_shot_classification_pb2_grpc as pb_grpc

    load_model(server, path)
    stub = pb_grpc.ZeroShotClassificationServiceStub(server.channel)
    call = lambda t: stub.ClassifyZeroShot(pb.ClassifyZeroShotRequest(  # noqa: E731
        model=str(path), sequence=t, candidate_labels=LABELS), timeout=600)

    def run():
        responses = list(pool.map(call, texts))
        batch_sizes[:] = [r.run.batch_size for r in responses]
        return [[(l.label, l.score) for l in r.labels] for r in responses]
    return run


def compare(ours, reference) -> tuple[bool, float]:
    same = len(ours) == len(reference) and all([l for l, _ in a] == [l for l, _ in b] for a, b in zip(ours, reference))
    diff = max(abs(x[1] - y[1]) for a, b in zip(ours, reference) for x, y in zip(a, b))
    return same, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--texts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per forward pass (both sides)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both sides)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; each run reports its best")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    env = environment()
    print_environment(env)
    texts = [f"{SENTENCES[i % len(SENTENCES)]} ({i})" for i in range(args.texts)]
    pairs = len(texts) * len(LABELS)
    grpc_name = f"pipeserve gRPC server, {args.concurrency} concurrent callers, 1 text per call"
    names = {"transformers": f"transformers.pipeline, batch_size={args.batch_size} pairs",
             "single": f"pipeserve pipeline, 1 caller, 1 text per call ({len(LABELS)} pairs per forward pass)",
             "grpc": grpc_name + f", server batches of up to {max(1, args.batch_size // len(LABELS))} texts = "
                                 f"{args.batch_size} pairs"}
    from grpc_testing import make_server
    from pipeserve.pipelines.zero_shot_classification import ZeroShotClassificationPipeline

    # Pairs per forward pass, as transformers' batch_size; the batcher groups up to
    # batch_size // len(LABELS) callers so that one group fills one forward pass.
    ZeroShotClassificationPipeline.max_batch_size = args.batch_size
    batch_sizes: list[int] = []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.concurrency) as pool:
        path = build_checkpoint(args.size, Path(tmp))
        server = make_server(max_batch_size=max(1, args.batch_size // len(LABELS)), max_batch_wait_ms=5.0)
        try:
            runners = {names["transformers"]: transformers_runner(path, texts, args.batch_size),
                       names["single"]: pipeline_runner(path, texts, args.batch_size),
                       names["grpc"]: grpc_runner(server, pool, path, texts, batch_sizes)}
            timings, outputs = interleaved_best(runners, args.rounds)
        finally:
            server.stop()
    reference = outputs[names["transformers"]]
    checks = {names["single"]: compare(outputs[names["single"]], reference),
              names["grpc"]: compare(outputs[names["grpc"]], reference)}

    result = {
        "benchmark": "zero-shot-classification",
        "model": f"BART {args.size} random weights ({SIZES[args.size]}), 3 NLI labels, float32",
        "texts": args.texts, "labels_per_text": len(LABELS), "pairs": pairs,
        "batch_size_pairs": args.batch_size, "concurrency": args.concurrency, "torch_threads": args.threads,
        "rounds": args.rounds, "grpc_request_batch_sizes": sorted(set(batch_sizes)), "environment": env,
        "runs": {n: {"seconds": round(t["seconds"], 4), "pairs_per_s": round(pairs / t["seconds"], 2),
                     "every_round_seconds": t["all_seconds"]} for n, t in timings.items()},
        "outputs_match_transformers": {n: {"same_labels": s, "max_score_diff": d} for n, (s, d) in checks.items()},
        "note": f"best of {args.rounds} interleaved rounds after a warm-up call each",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Zero-shot classification throughput",
        "",
        f"{result['model']}; {args.texts} texts x {len(LABELS)} labels = {pairs} pairs, batch size "
        f"{args.batch_size} pairs on every side, {args.threads} torch thread(s) on every side, best of "
        f"{args.rounds} interleaved rounds.",
        "",
        environment_markdown(env),
        "",
        "| run | seconds | pairs/s | / transformers |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {n} | {v['seconds']:.3f} | {v['pairs_per_s']:.1f} | "
          f"{v['pairs_per_s'] / result['runs'][names['transformers']]['pairs_per_s']:.2f}x |"
          for n, v in result["runs"].items()],
        "",
        *[f"{n}: same labels as transformers: {s}; max score difference {d:.2e}." for n, (s, d) in checks.items()],
        f"gRPC requests per server batch seen: {result['grpc_request_batch_sizes']}.",
        "",
        f"Note: {result['note']}.",
        "",
    ]
    (args.out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
