"""One transcription at a time, two source trees side by side: is a single request slower (or
faster) in one tree than in another? (issue #16: "single-request speed not worse".)

Each round starts a fresh process per tree, in turn (A B A B ...: the shared machine's load
changes spread over both), that loads the embedded Whisper tiny.en default as the server does
(compute lane installed, 2 threads, the server's OpenMP and heap settings where the tree has
them), warms up, then transcribes the short clips (espeak-ng sentences of
tests/whisper_checkpoints.SENTENCES, 2-5 s) one after another, `--repeats` times, the way the
tree's server drives a Transcribe call (a tree whose pipeline schedules its own model work is
driven from an ordinary thread; an older one runs each step of its generator on the lane).
Reported per tree: best and median over rounds of wall seconds and process CPU seconds per
clip, and whether every tree produced the same texts.

    PYTHONPATH=service:tests .venv/bin/python bench/asr/bench_single_ab.py \\
        --tree old=/tmp/asrthru-old --tree new=. --rounds 6
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

CHILD = r"""
import json, os, resource, sys, time
sys.path[:0] = [os.path.join(TREE, "service"), os.path.join(TREE, "clients", "python")]
import numpy as np
import torch
from pipeserve.serving import openmp_defaults  # noqa: F401  (the server's OpenMP settings)
from pipeserve.scheduling import compute
compute.install(THREADS)
# The server's manager sets the process's heap policy (runtime/manager.py, where the tree has one).
from pipeserve.config import Settings
from pipeserve.runtime.manager import ModelManager
heap = {"heap_mmap_threshold_bytes": HEAP} if "heap_mmap_threshold_bytes" in getattr(Settings, "__dataclass_fields__", {}) else {}
manager = ModelManager(Settings(**heap))
from pipeserve.checkpoints.embedded import embedded_model_dir
from pipeserve.checkpoints.hub import resolve
from pipeserve.pipelines.base import LoadOptions
from pipeserve.runtime.loading import load_pipeline
pipe = compute.call(load_pipeline, resolve(str(embedded_model_dir("automatic-speech-recognition"))), LoadOptions())
clips = [torch.from_numpy(np.load(p)) for p in CLIPS]
off_lane = getattr(pipe, "schedules_compute", False)

def transcribe(audio):
    if off_lane:
        *_, done = pipe.transcribe_stream(audio, {})
        return done
    it = compute.call(pipe.transcribe_stream, audio, {})
    done = None
    while True:
        item = compute.call(next, it, None)
        if item is None:
            return done
        done = item

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

for audio in clips[:2]:
    transcribe(audio)
walls, cpus, texts = [], [], []
for _ in range(REPEATS):
    w0, c0 = time.perf_counter(), cpu()
    texts = [transcribe(audio).text for audio in clips]
    walls.append((time.perf_counter() - w0) / len(clips))
    cpus.append((cpu() - c0) / len(clips))
print("RESULT " + json.dumps({"wall": min(walls), "cpu": min(cpus), "texts": texts}), flush=True)
"""


def make_clips(directory: Path, count: int) -> list[str]:
    sys.path[:0] = [str(ROOT / "service"), str(ROOT / "tests")]
    import numpy as np
    import whisper_checkpoints as wc
    from pipeserve.inputs.audio import load_audio_input

    paths = []
    for i, sentence in enumerate(wc.SENTENCES[:count]):
        audio = load_audio_input(data=wc.speak(sentence, directory / f"c{i}.wav"))
        path = directory / f"c{i}.npy"
        np.save(path, audio.numpy())
        paths.append(str(path))
    return paths


def run_child(tree: str, clips: list[str], threads: int, repeats: int, heap: int) -> dict:
    code = (f"TREE={tree!r}\nCLIPS={clips!r}\nTHREADS={threads}\nREPEATS={repeats}\nHEAP={heap}\n") + CHILD
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{tree}: {out.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True,
                        help="name=path of a source tree, or name=path@bytes: its server setting heap_mmap_threshold_bytes "
                             "(default 262144, the server's; 0 = glibc's adaptive heap; ignored by trees without it)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="passes over the clips in one process (best kept)")
    parser.add_argument("--clips", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    trees, heaps = {}, {}
    for spec in args.tree:
        name, path = spec.split("=", 1)
        path, _, heap = path.partition("@")
        trees[name], heaps[name] = path, int(heap) if heap else 256 << 10
    with tempfile.TemporaryDirectory() as tmp:
        clips = make_clips(Path(tmp), args.clips)
        results: dict[str, list[dict]] = {name: [] for name in trees}
        for r in range(args.rounds):
            for name, path in trees.items():
                res = run_child(str(Path(path).resolve()), clips, args.threads, args.repeats, heaps[name])
                results[name].append(res)
                print(f"round {r} {name}: wall {res['wall']:.3f} s/clip, cpu {res['cpu']:.3f} s/clip", flush=True)
    texts = {name: rs[0]["texts"] for name, rs in results.items()}
    same = len({json.dumps(t) for t in texts.values()}) == 1
    for name, rs in results.items():
        w = [x["wall"] for x in rs]
        c = [x["cpu"] for x in rs]
        print(f"{name}: wall best {min(w):.3f} median {statistics.median(w):.3f} s/clip; "
              f"cpu best {min(c):.3f} median {statistics.median(c):.3f} s/clip")
    print("same texts in every tree:", same)


if __name__ == "__main__":
    main()
