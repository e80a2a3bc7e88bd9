"""Every CUDA path, on a real GPU: each family's parity with transformers in float16 and bfloat16
(tolerances derived from the dtype: tests/device_parity.py), greedy tokens, int8 on CUDA, device
placement, device_map="auto" on one GPU (whole, and split with the CPU under a memory cap), and
the manager's memory budget and eviction with real device memory.

Marked `cuda`: conftest.py skips them where torch.cuda.is_available() is false (the one expected
platform skip on CPU-only CI). scripts/gpu-check runs them on a GPU machine; the same parity code
runs on the CPU in bfloat16 in tests/test_device_parity.py.
"""
from __future__ import annotations

import asyncio
import gc

import pytest
import torch
from torch import nn

import device_parity as dp

pytestmark = pytest.mark.cuda

DEVICE = "cuda:0"
HALF = [torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each case's tiny checkpoint and float32 CPU reference, built once for both dtypes."""
    built: dict[str, tuple] = {}

    def get(name: str):
        if name not in built:
            case = dp.CASES[name]
            built[name] = case.build(tmp_path_factory.mktemp(name))
        return built[name]

    return get


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", list(dp.CASES))
def test_logits_parity_on_cuda(checkpoints, name, dtype):
    directory, reference = checkpoints(name)
    result = dp.logits_parity(dp.CASES[name], directory, reference, DEVICE, dtype)
    print(f"\nPARITY {result}")  # the run's report collects these lines
    result.check()


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", dp.CAUSAL)
def test_greedy_tokens_on_cuda(checkpoints, name, dtype):
    from transformers import AutoTokenizer

    directory, reference = checkpoints(name)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    equal = dp.greedy_parity(dp.CASES[name], directory, reference, tokenizer, DEVICE, dtype)
    assert equal >= 1, "the first greedy token must agree (a tie there would make the test meaningless)"


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: str(d).removeprefix("torch."))
def test_whisper_greedy_transcription_on_cuda(checkpoints, dtype):
    """Our Whisper pipeline's greedy text on the GPU equals transformers' pipeline on the GPU in
    the same dtype (the tiny checkpoint's init_std 0.5 makes its logits decisive)."""
    import numpy as np
    from transformers import pipeline

    from harness import load_pipeline

    directory, _ = checkpoints("whisper-en")
    rng = np.random.default_rng(3)
    t = np.arange(7 * 16000) / 16000
    audio = (0.1 * rng.standard_normal(t.shape) + 0.3 * np.sin(2 * np.pi * 300 * t) * (np.sin(t) > 0)).astype(np.float32)
    name = str(dtype).removeprefix("torch.")
    ours = load_pipeline(directory, device=DEVICE, dtype=name)
    try:
        got = ours.transcribe([torch.from_numpy(audio)], {"max_new_tokens": 40, "return_timestamps": "none"})[0]
    finally:
        ours.close()
    import inspect

    dtype_arg = "dtype" if "dtype" in inspect.signature(pipeline).parameters else "torch_dtype"  # transformers 4.x
    hf = pipeline("automatic-speech-recognition", model=str(directory), device=DEVICE, **{dtype_arg: dtype})
    ref = hf(audio.copy(), generate_kwargs={"num_beams": 1, "max_new_tokens": 40})
    assert got.text == ref["text"]


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: str(d).removeprefix("torch."))
def test_int8_on_cuda(checkpoints, dtype):
    from harness import load_pipeline
    from pipeserve.layers.quantization import Int8Linear

    directory, reference = checkpoints("gpt2")
    name = str(dtype).removeprefix("torch.")
    full = load_pipeline(directory, device=DEVICE, dtype=name)
    int8 = load_pipeline(directory, device=DEVICE, dtype=name, load_in_8bit=True)
    try:
        quantized = [m for m in int8.model.modules() if isinstance(m, Int8Linear)]
        assert quantized and not any(isinstance(m, nn.Linear) for m in int8.model.modules())
        assert all(m.weight.dtype == torch.int8 and m.weight.is_cuda for m in quantized)
        assert int8.memory_bytes() < full.memory_bytes()
        ids = torch.tensor([full.encode("The quick brown fox jumps")])
        with torch.no_grad():
            truth = reference(ids).logits
            out = int8.model(ids.to(DEVICE)).cpu()
        # int8 rounding moves logits by a small fraction of their range (as on the CPU), plus
        # the activation dtype's own rounding.
        scale = truth.abs().max().item()
        assert dp.max_diff(out, truth) < 0.05 * scale + dp.tolerance(dtype, scale, 2)
        kernels = {"int8 weight-only kernel" if m._packed_ok else "dequantize" for m in quantized}
        print(f"\nINT8 {name}: {sorted(kernels)}")
        [result] = int8.generate(["The quick brown fox"], {"max_new_tokens": 10, "min_new_tokens": 10})
        assert result.sequences[0].generated_tokens == 10
    finally:
        full.close()
        int8.close()


def test_placement_on_an_indexed_device(checkpoints):
    from harness import load_pipeline

    directory, _ = checkpoints("llama")
    pipe = load_pipeline(directory, device=DEVICE)
    try:
        assert pipe.describe()["device"] == DEVICE
        assert {p.device for p in pipe.model.parameters()} == {torch.device(DEVICE)}
        assert pipe.engine.cache.devices == [torch.device(DEVICE)] * pipe.model.num_layers
        [result] = pipe.generate(["Hello world"], {"max_new_tokens": 5, "min_new_tokens": 5})
        assert result.sequences[0].generated_tokens == 5
    finally:
        pipe.close()


def test_auto_device_map_fits_on_one_gpu(checkpoints):
    from harness import load_pipeline

    directory, _ = checkpoints("llama")
    pipe = load_pipeline(directory, device="auto")
    try:
        assert pipe.device == torch.device(DEVICE)
        assert pipe.model.layer_devices == [torch.device(DEVICE)] * pipe.model.num_layers
    finally:
        pipe.close()


def test_auto_device_map_splits_between_gpu_and_cpu_under_a_memory_cap(checkpoints, monkeypatch):
    """device_map="auto" with the GPU's free memory capped at the head plus one layer: the first
    layer on the GPU, the second on the CPU, the KV cache beside each layer; the logits equal the
    float32 truth and greedy tokens equal the all-GPU model's."""
    from harness import load_pipeline
    from pipeserve.layers import device_map

    directory, reference = checkpoints("llama")
    whole = load_pipeline(directory, device=DEVICE)
    layers = device_map.decoder_layers(whole.model)
    layer_bytes = device_map._bytes(layers[0])
    head_bytes = device_map._bytes(whole.model) - sum(device_map._bytes(l) for l in layers)
    cap = int((head_bytes + 1.5 * layer_bytes) / (1 - device_map.RESERVE_FRACTION))
    monkeypatch.setattr(device_map, "free_memory", lambda: [(DEVICE, cap), ("cpu", 1 << 40)])
    split = load_pipeline(directory, device="auto")
    try:
        assert split.model.layer_devices == [torch.device(DEVICE), torch.device("cpu")]
        assert split.model.lm_head.weight.device == torch.device(DEVICE)
        assert {str(d) for d in split.engine.cache.devices} == {DEVICE, "cpu"}
        ids = torch.randint(3, reference.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            truth = reference(ids).logits
            assert dp.max_diff(split.model(ids.to(DEVICE)), truth) <= dp.tolerance(torch.float32, 0, 2)
        options = {"max_new_tokens": 12, "min_new_tokens": 12}
        a = [t.token for t in split.generate(["Hello world"], options)[0].sequences[0].tokens]
        b = [t.token for t in whole.generate(["Hello world"], options)[0].sequences[0].tokens]
        prompt = whole.encode("Hello world")
        dp.assert_same_greedy(a, b, lambda prefix: reference(torch.tensor([prompt + prefix])).logits[0, -1],
                              dp.tolerance(torch.float32, 0, 2), "split vs whole")
    finally:
        split.close()
        whole.close()


def _allocated() -> int:
    """Bytes held by live tensors on the GPU, after collecting garbage; cuBLAS workspaces (kept
    by the allocator per stream once a matmul ran) are released first so they do not count."""
    gc.collect()
    torch.cuda.synchronize()
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    return torch.cuda.memory_allocated()


async def test_memory_budget_evicts_and_frees_device_memory(checkpoints):
    """The manager's budget on real device memory: the second model evicts the idle first one,
    its memory goes back to the allocator, and after unloading everything the allocated bytes
    are back at the baseline (nothing - pipeline, engine, KV cache - keeps a tensor alive)."""
    from pipeserve.config import Settings
    from pipeserve.runtime.manager import ModelManager

    first, _ = checkpoints("llama")
    second, _ = checkpoints("qwen2")
    baseline = _allocated()
    sizes = [sum(p.stat().st_size for p in d.glob("*.safetensors")) for d in (first, second)]
    manager = ModelManager(Settings(device=DEVICE, memory_budget_bytes=int(max(sizes) * 1.5)))
    try:
        a = await manager.load(str(first))
        assert a.pipeline.device == torch.device(DEVICE)
        result = await manager.run(a.pipeline.generate, ["Hello"], {"max_new_tokens": 4, "min_new_tokens": 4})
        assert result[0].sequences[0].generated_tokens == 4
        with_first = _allocated()
        assert with_first - baseline >= a.bytes, "the model's weights live on the GPU"
        b = await manager.load(str(second))
        assert [e.name for e in manager.entries()] == [str(second)], "the idle first model was evicted"
        assert _allocated() - baseline < with_first - baseline + b.bytes
        await manager.unload(str(second))
        del a, b, result
        await asyncio.sleep(0)
        assert _allocated() == baseline
    finally:
        await manager.close()
