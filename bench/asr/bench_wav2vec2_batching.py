"""Does batching several requests' waveforms into one wav2vec2 forward pay on this CPU?

The question behind issue #16's "the same for CTC where it pays": Whisper pads every request to
a 30 s window and decodes token by token, so requests batched together share mostly-idle work;
a CTC model runs one forward over exactly the request's samples. This script measures, in
process, the pipeline's own forward (CTCASRPipeline.forward: normalised waveforms -> frame ids)
on a set of clips run one at a time against the same clips as one batch, for wav2vec2-base size
(12 x 768, the 7-layer conv feature encoder) with random weights, both normalisations:
  - group norm (facebook/wav2vec2-base-960h): a padded row would change the normalisation over
    time, so only equal-length inputs may share a forward; different requests practically never
    have equal lengths, so this model batches only the "equal lengths" case;
  - layer norm (wav2vec2-large-960h-lv60-self style, here at base size): right-padding with an
    attention mask keeps each row's output (up to float rounding), so any lengths batch.
Clip sets: espeak-ng sentences of unequal length (2-5 s, what concurrent callers send), and the
same count of equal-length 4 s cuts (the best case for batching: no padding).
Reports the best of --rounds interleaved rounds for alone and batched (wall time, and the
process's CPU time, which other processes' load disturbs less), the speedup, the padded share
of the batch, and whether every row's frame ids equal its alone run.

    PYTHONPATH=service:tests .venv/bin/python bench/asr/bench_wav2vec2_batching.py --batch 4 8 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for extra in (ROOT / "service", ROOT / "tests", ROOT / "bench"):
    sys.path.insert(0, str(extra))


def make_checkpoint(directory: Path, norm: str) -> Path:
    """Random wav2vec2-base-size weights; norm "group" (base-960h) or "layer" (lv60 style)."""
    import torch
    from transformers import (Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC,
                              Wav2Vec2Processor)
    from wav2vec2_checkpoints import VOCAB

    extra = dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True) if norm == "layer" else {}
    torch.manual_seed(0)
    model = Wav2Vec2ForCTC(Wav2Vec2Config(vocab_size=len(VOCAB), pad_token_id=0, **extra)).eval()
    with torch.no_grad():  # a varied argmax (random heads pick one letter everywhere)
        model.lm_head.weight.normal_(0, 0.5)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(VOCAB))
    model.save_pretrained(directory, safe_serialization=True)
    Wav2Vec2Processor(feature_extractor=Wav2Vec2FeatureExtractor(return_attention_mask=norm == "layer"),
                      tokenizer=Wav2Vec2CTCTokenizer(str(directory / "vocab.json"))).save_pretrained(directory)
    return directory


def clips(work: Path, count: int) -> dict[str, list]:
    from pipeserve.inputs.audio import load_audio_input
    from whisper_checkpoints import SENTENCES, speak

    import torch

    spoken = [load_audio_input(data=speak(s, work / f"s{i}.wav")) for i, s in enumerate(SENTENCES)]
    whole = torch.cat(spoken)  # ~50 s: 4 s cuts for up to 12 clips
    if whole.shape[0] < count * 64000:
        raise SystemExit(f"at most {whole.shape[0] // 64000} clips per batch")
    equal = [whole[i * 64000:(i + 1) * 64000] for i in range(count)]
    return {"unequal lengths (sentences)": spoken[:count], "equal lengths (4 s each)": equal}


def measure(pipe, waves: list, rounds: int) -> dict:
    inputs = [pipe.normalize(w) for w in waves]
    masked = pipe.model.config.feat_extract_norm == "layer"
    can_batch = masked or len({w.shape[0] for w in waves}) == 1
    alone = lambda: [pipe.forward([x])[0] for x in inputs]  # noqa: E731
    together = lambda: pipe.forward(inputs)  # noqa: E731
    alone(), together() if can_batch else None  # warm-up
    times = {"alone": [], "batched": []}
    cpu = {"alone": [], "batched": []}
    outputs = {}
    for _ in range(rounds):
        for name, run in (("alone", alone), ("batched", together)):
            if name == "batched" and not can_batch:
                continue
            started, cpu_started = time.perf_counter(), time.process_time()
            outputs[name] = run()
            times[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - cpu_started)
    audio_s = sum(w.shape[0] for w in waves) / 16000
    row = {"clips": len(waves), "audio_s": round(audio_s, 2), "alone_s": min(times["alone"]),
           "alone_every_round": [round(t, 3) for t in times["alone"]], "alone_cpu_s": min(cpu["alone"])}
    if not can_batch:
        row["batched"] = "not allowed: group-norm feature encoder, unequal lengths"
        return row
    longest = max(w.shape[0] for w in waves)
    row.update(batched_s=min(times["batched"]), batched_every_round=[round(t, 3) for t in times["batched"]],
               speedup=min(times["alone"]) / min(times["batched"]), batched_cpu_s=min(cpu["batched"]),
               cpu_speedup=min(cpu["alone"]) / min(cpu["batched"]),
               padded_share=1 - sum(w.shape[0] for w in waves) / (longest * len(waves)),
               same_frame_ids=all(a[0].equal(b[0]) for a, b in zip(outputs["alone"], outputs["batched"])),
               frames_differing=sum(int((a[0] != b[0]).sum()) for a, b in zip(outputs["alone"], outputs["batched"])),
               frames=sum(int(a[0].numel()) for a in outputs["alone"]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[4, 8], help="clips per batch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "wav2vec2_batching.json")
    args = parser.parse_args()
    from pipeserve.serving.openmp_defaults import apply_openmp_defaults

    apply_openmp_defaults()
    import torch
    from bench_env import environment, print_environment
    from harness import load_pipeline

    torch.set_num_threads(args.threads)
    env = environment()
    print_environment(env)
    work = Path(tempfile.mkdtemp(prefix="bench_w2v2_batching_"))
    sets = clips(work, max(args.batch))
    rows = []
    for norm in ("group", "layer"):
        pipe = load_pipeline(make_checkpoint(work / norm, norm))
        for set_name, waves in sets.items():
            for n in args.batch:
                row = {"feature_encoder_norm": norm, "clips_set": set_name, **measure(pipe, waves[:n], args.rounds)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        del pipe
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": env, "threads": args.threads, "rounds": args.rounds,
                                    "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
