"""Image classification throughput: pipeserve's ImageClassificationPipeline against
transformers.pipeline("image-classification") on the same random-weight ViT checkpoint, the
same encoded JPEG photographs and the same batch size.

Both sides start from encoded bytes (transformers gets lazily opened PIL images, so decoding
is timed on both), run on CPU in float32 and return top-5 labels. pipeserve is measured with
one caller and with `--concurrency` callers (threads each sending batches, as the server's
worker pool does); transformers with its own `batch_size` loop. One timed run per
configuration after one warm-up batch. Results: results.json and results.md in --out.

    PYTHONPATH=service:tests python bench/image_classification/run.py --size small
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "service"), str(ROOT / "tests")]

from pipeserve.serving.openmp_defaults import apply_openmp_defaults  # noqa: E402

apply_openmp_defaults()  # the server's OpenMP settings, before torch loads (both sides share them)

import torch  # noqa: E402

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


def time_ours(pipeline, images: list[bytes], batch_size: int, concurrency: int):
    batches = chunks(images, batch_size)
    pipeline.classify(batches[0], {})  # warm-up
    start = time.perf_counter()
    if concurrency == 1:
        results = [r for batch in batches for r in pipeline.classify(batch, {})]
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            results = [r for out in pool.map(lambda b: pipeline.classify(b, {}), batches) for r in out]
    return time.perf_counter() - start, results


def time_transformers(pipe, images: list[bytes], batch_size: int):
    from PIL import Image

    opened = lambda batch: [Image.open(io.BytesIO(b)) for b in batch]  # noqa: E731 - lazy: decode is timed
    pipe(opened(images[:batch_size]), batch_size=batch_size)  # warm-up
    start = time.perf_counter()
    results = pipe(opened(images), batch_size=batch_size)
    return time.perf_counter() - start, [[(r["label"], r["score"]) for r in out] for out in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both sides)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    from harness import load_pipeline
    from transformers import pipeline as hf_pipeline

    images = photographs(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(args.size, Path(tmp))
        ours = load_pipeline(path)
        theirs = hf_pipeline("image-classification", model=str(path), device="cpu")
        runs = {}
        elapsed, reference = time_transformers(theirs, images, args.batch_size)
        runs["transformers.pipeline"] = elapsed
        elapsed, single = time_ours(ours, images, args.batch_size, 1)
        runs["pipeserve, 1 caller"] = elapsed
        elapsed, concurrent = time_ours(ours, images, args.batch_size, args.concurrency)
        runs[f"pipeserve, {args.concurrency} callers"] = elapsed

    same_labels = all([l for l, _ in a] == [l for l, _ in b] for a, b in zip(single, reference))
    max_score_diff = max(abs(x[1] - y[1]) for a, b in zip(single, reference) for x, y in zip(a, b))
    result = {
        "benchmark": "image-classification",
        "model": f"ViT {args.size} random weights ({SIZES[args.size]}), 1000 labels, float32",
        "images": args.images,
        "input": "JPEG photographs from skimage.data (512x512, 400x600, 300x451), decoded in the timed loop",
        "batch_size": args.batch_size,
        "torch_threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "runs": {name: {"seconds": round(s, 4), "images_per_s": round(args.images / s, 2)} for name, s in runs.items()},
        "outputs_match_transformers": {"same_top5_labels": same_labels, "max_score_diff": max_score_diff},
        "note": "one timed run each after one warm-up batch, on a shared machine: indicative, not precise",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Image classification throughput",
        "",
        f"{result['model']}; {args.images} images, batch size {args.batch_size}, "
        f"{args.threads} torch thread(s), CPU ({result['cpu_count']} cores visible, shared), torch {torch.__version__}.",
        f"Input: {result['input']}.",
        "",
        "| run | seconds | images/s |",
        "| --- | ---: | ---: |",
        *[f"| {name} | {v['seconds']:.3f} | {v['images_per_s']:.1f} |" for name, v in result["runs"].items()],
        "",
        f"Outputs: same top-5 labels as transformers: {same_labels}; max score difference {max_score_diff:.2e}.",
        "",
        f"Note: {result['note']}.",
        "",
    ]
    (args.out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
