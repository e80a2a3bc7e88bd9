"""Image classification throughput: pipeserve's ImageClassificationPipeline against
transformers.pipeline("image-classification") on the same random-weight ViT checkpoint, the
same encoded JPEG photographs and the same batch size.

Both sides start from encoded bytes (transformers gets lazily opened PIL images, so decoding
is timed on both), run on CPU in float32 with the same batch size and return top-5 labels.
Two modes, each side in the same one:
- one caller, `--threads` torch threads: transformers' own `batch_size` loop against
  pipeserve's pipeline called batch after batch;
- `--concurrency` cores: pipeserve with `--concurrency` callers (threads each sending batches,
  as the server's worker pool does, `--threads` torch threads each) against transformers'
  loop with `--concurrency` x `--threads` torch threads (transformers has no concurrent
  callers; intra-op threads are its way to use the same cores).
After one warm-up call each, all runs go in turn for `--rounds` rounds; each reports its best
round (every round is in the JSON). Results: results.json and results.md in --out, with the
CPU model and exact versions.

    PYTHONPATH=service:tests python bench/image_classification/run.py --size small --rounds 5
"""
from __future__ import annotations

import argparse
import io
import json
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

# ViT shapes: tiny is the test size; small = ViT-Tiny/16 (DeiT-tiny, 5.7M params); base = ViT-B/16.
SIZES = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                 image_size=32, patch_size=8),
    "small": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                  image_size=224, patch_size=16),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 image_size=224, patch_size=16),
}


def build_checkpoint(size: str, directory: Path) -> Path:
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    torch.manual_seed(0)
    shape = SIZES[size]
    model = ViTForImageClassification(ViTConfig(**shape, num_labels=1000)).eval()
    model.save_pretrained(directory)
    side = shape["image_size"]
    ViTImageProcessorPil(size={"height": side, "width": side}).save_pretrained(directory)
    return directory


def photographs(count: int) -> list[bytes]:
    import skimage.data as data
    from PIL import Image

    encoded = []
    for name in ("astronaut", "coffee", "chelsea"):
        buffer = io.BytesIO()
        Image.fromarray(getattr(data, name)()).save(buffer, "JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return [encoded[i % len(encoded)] for i in range(count)]


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def ours_runner(pipeline, images: list[bytes], batch_size: int, concurrency: int, pool):
    batches = chunks(images, batch_size)
    if concurrency == 1:
        return lambda: [r for batch in batches for r in pipeline.classify(batch, {})]
    return lambda: [r for out in pool.map(lambda b: pipeline.classify(b, {}), batches) for r in out]


def transformers_runner(pipe, images: list[bytes], batch_size: int, threads: int):
    from PIL import Image

    def run():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            opened = [Image.open(io.BytesIO(b)) for b in images]  # lazy: decoding is timed
            return [[(r["label"], r["score"]) for r in out] for out in pipe(opened, batch_size=batch_size)]
        finally:
            torch.set_num_threads(before)
    return run


def compare(ours, reference) -> tuple[bool, float]:
    same = len(ours) == len(reference) and all([l for l, _ in a] == [l for l, _ in b] for a, b in zip(ours, reference))
    diff = max(abs(x[1] - y[1]) for a, b in zip(ours, reference) for x, y in zip(a, b))
    return same, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both sides)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; each run reports its best")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    env = environment()
    print_environment(env)
    from harness import load_pipeline
    from transformers import pipeline as hf_pipeline

    images = photographs(args.images)
    cores = args.concurrency * args.threads
    names = {"ref1": f"transformers.pipeline, batch {args.batch_size}, {args.threads} torch thread(s)",
             "ours1": f"pipeserve, 1 caller, batch {args.batch_size}, {args.threads} torch thread(s)",
             "refn": f"transformers.pipeline, batch {args.batch_size}, {cores} torch threads",
             "oursn": f"pipeserve, {args.concurrency} callers, batch {args.batch_size}, {args.threads} torch "
                      f"thread(s) each"}
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.concurrency) as pool:
        path = build_checkpoint(args.size, Path(tmp))
        ours = load_pipeline(path)
        theirs = hf_pipeline("image-classification", model=str(path), device="cpu")
        runners = {names["ref1"]: transformers_runner(theirs, images, args.batch_size, args.threads),
                   names["ours1"]: ours_runner(ours, images, args.batch_size, 1, pool),
                   names["refn"]: transformers_runner(theirs, images, args.batch_size, cores),
                   names["oursn"]: ours_runner(ours, images, args.batch_size, args.concurrency, pool)}
        timings, outputs = interleaved_best(runners, args.rounds)

    reference = outputs[names["ref1"]]
    checks = {n: compare(outputs[n], reference) for n in (names["ours1"], names["oursn"], names["refn"])}
    pairs = [(names["ours1"], names["ref1"]), (names["oursn"], names["refn"]), (names["oursn"], names["ref1"])]
    result = {
        "benchmark": "image-classification",
        "model": f"ViT {args.size} random weights ({SIZES[args.size]}), 1000 labels, float32",
        "images": args.images,
        "input": "JPEG photographs from skimage.data (512x512, 400x600, 300x451), decoded in the timed loop",
        "batch_size": args.batch_size,
        "torch_threads": args.threads,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "environment": env,
        "runs": {name: {"seconds": round(t["seconds"], 4), "images_per_s": round(args.images / t["seconds"], 2),
                        "every_round_seconds": t["all_seconds"]} for name, t in timings.items()},
        "ratios": [{"pipeserve": a, "transformers": b,
                    "ratio": timings[b]["seconds"] / timings[a]["seconds"]} for a, b in pairs],
        "outputs_match_transformers": {n: {"same_top5_labels": s, "max_score_diff": d} for n, (s, d) in checks.items()},
        "note": f"best of {args.rounds} interleaved rounds after a warm-up call each",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Image classification throughput",
        "",
        f"{result['model']}; {args.images} images, batch size {args.batch_size} on every side, best of "
        f"{args.rounds} interleaved rounds.",
        f"Input: {result['input']}.",
        "",
        environment_markdown(env),
        "",
        "| run | seconds | images/s |",
        "| --- | ---: | ---: |",
        *[f"| {name} | {v['seconds']:.3f} | {v['images_per_s']:.1f} |" for name, v in result["runs"].items()],
        "",
        "| pipeserve | transformers | pipeserve / transformers |",
        "| --- | --- | ---: |",
        *[f"| {r['pipeserve']} | {r['transformers']} | {r['ratio']:.2f}x |" for r in result["ratios"]],
        "",
        *[f"{n}: same top-5 labels as transformers ({names['ref1']}): {s}; max score difference {d:.2e}."
          for n, (s, d) in checks.items()],
        "",
        f"Note: {result['note']}.",
        "",
    ]
    (args.out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
