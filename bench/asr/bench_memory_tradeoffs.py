"""What each memory saving costs in transcription time, measured in one process so that every
variant sees the same machine load: the variants take turns call by call, and the report
gives each one's best and median time over the rounds (Whisper tiny.en embedded default, an
espeak-ng clip of about 5 s, greedy, one thread). Time is the process's CPU time (user + system,
page faults included) beside the wall clock: on a shared machine the wall clock also counts
the time other processes held the core, the CPU time far less so.

Variants:
  adaptive heap       glibc's defaults as they end up after a load: the mmap threshold has
                      risen to 32 MiB, so activations come from the heap and stay resident
  mapped blocks       runtime/heap.limit_heap_slack(256 KiB): blocks >= 256 KiB are mapped and
                      unmapped per call (their pages are faulted in again each call); the
                      server's default (heap_mmap_threshold_bytes)
  screening head      greedy steps read the verified head's bfloat16 screen (a 39 MiB copy;
                      layers/verified_head.py) instead of the float32 projection, as Whisper
                      did before models/whisper.py opted out ("exact_head"); adaptive heap
  code pages released runtime/code_pages.release_code_pages() before every call (the server
                      releases them around each load only): the worst case of what the
                      first call after a load pays to fault its code back in; mapped blocks
  float16 weights     a second copy of the model loaded with weights_dtype="float16"
                      (layers/half_storage.py), mapped blocks as the server runs it: compare
                      it with "mapped blocks"

    .venv/bin/python bench/asr/bench_memory_tradeoffs.py --rounds 8 [--out bench/asr/results]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_cold_start import make_clip

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import soundfile as sf
    from pipeserve.checkpoints.embedded import embedded_model_dir
    from pipeserve.checkpoints.hub import resolve
    from pipeserve.pipelines.base import LoadOptions
    from pipeserve.runtime.code_pages import release_code_pages
    from pipeserve.runtime.heap import limit_heap_slack, release_free_heap
    from pipeserve.runtime.loading import load_pipeline

    torch.set_num_threads(args.threads)
    libc = ctypes.CDLL("libc.so.6")
    with tempfile.TemporaryDirectory() as tmp:
        audio, _ = sf.read(make_clip(Path(tmp)), dtype="float32")
    waveform = torch.from_numpy(audio)
    pipe = load_pipeline(resolve(str(embedded_model_dir("automatic-speech-recognition"))), LoadOptions())
    from pipeserve.layers.verified_head import VerifiedHead

    decoder = pipe.model.decoder
    head = VerifiedHead(decoder.embed_tokens.weight, pipe.settings.no_timestamps_token_id + 1)
    half = load_pipeline(resolve(str(embedded_model_dir("automatic-speech-recognition"))),
                         LoadOptions(weights_dtype="float16"))

    def adaptive() -> None:  # glibc's state after large frees: threshold 32 MiB, heap keeps pages
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)
        decoder.verified_head = None

    def mapped() -> None:
        limit_heap_slack(256 << 10)
        release_free_heap()
        decoder.verified_head = None

    def released() -> None:
        mapped()
        release_code_pages()

    def screened() -> None:
        adaptive()
        decoder.verified_head = head

    variants = {"adaptive heap": (adaptive, pipe), "mapped blocks": (mapped, pipe),
                "screening head": (screened, pipe), "code pages released": (released, pipe),
                "float16 weights": (mapped, half)}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    wall: dict[str, list[float]] = {name: [] for name in variants}
    texts = {}
    for _, model in variants.values():
        model.transcribe([waveform])  # warm-up: oneDNN primitives, first-touch pages
    for round_ in range(args.rounds):
        for name, (setup, model) in variants.items():
            setup()
            started, started_cpu = time.perf_counter(), time.process_time()
            texts[name] = model.transcribe([waveform])[0].text
            cpu[name].append(time.process_time() - started_cpu)
            wall[name].append(time.perf_counter() - started)
        print(f"round {round_}: " + ", ".join(f"{n} cpu {cpu[n][-1] * 1000:.0f} / wall {wall[n][-1] * 1000:.0f} ms"
                                              for n in variants), flush=True)
    base = "adaptive heap"
    report = {name: {"cpu_best_ms": min(cpu[name]) * 1000, "cpu_median_ms": statistics.median(cpu[name]) * 1000,
                     "cpu_best_vs_adaptive": min(cpu[name]) / min(cpu[base]),
                     "cpu_median_vs_adaptive": statistics.median(cpu[name]) / statistics.median(cpu[base]),
                     "cpu_median_vs_mapped": statistics.median(cpu[name]) / statistics.median(cpu["mapped blocks"]),
                     "cpu_best_vs_mapped": min(cpu[name]) / min(cpu["mapped blocks"]),
                     "wall_best_ms": min(wall[name]) * 1000,
                     "wall_best_vs_adaptive": min(wall[name]) / min(wall[base]),
                     "text": texts[name]} for name in variants}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "memory_tradeoffs.json").write_text(
            json.dumps({"report": report, "cpu_s": cpu, "wall_s": wall}, indent=1))


if __name__ == "__main__":
    main()
