"""A decoding step's attention block in one native call (kernels/decode_attention.cpp through
kv_cache.CacheView.attend_step_native), as quantized Gemma takes it: the same tokens and, to
float32 rounding, the same log-probabilities as the torch path, with ragged batches, sliding
window rings that wrap and sequences joining mid-generation; and clear errors for operands the
kernel cannot take."""
from __future__ import annotations

import pytest
import torch

from native_kernels import require_native_kernels
from pipeserve.layers import kv_cache
from pipeserve.scheduling.generation_engine import DoneEvent, TokenEvent


@pytest.fixture(scope="module", autouse=True)
def kernels():
    require_native_kernels()


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from generation_checkpoints import build
    from harness import load_pipeline

    directory = tmp_path_factory.mktemp("gemma3-native-attention")
    build("gemma3", directory)  # sliding window 4: rings wrap within a few steps
    pipeline = load_pipeline(directory, load_in_8bit=True)
    yield pipeline
    pipeline.close()


def _switch(model, on: bool) -> None:
    for module in model.modules():
        if hasattr(module, "native_kernels"):
            module.native_kernels = on


def _generate(pipe, prompts: list[list[int]], new_tokens: int) -> list[tuple[list[int], list[float]]]:
    """Greedy with log-probabilities, all prompts at once (one engine batch)."""
    params = pipe.parameters({"max_new_tokens": new_tokens, "ignore_eos": True, "return_logprobs": True})
    handles = [pipe.engine.submit(ids, params) for ids in prompts]
    results = []
    for handle in handles:
        events = list(handle)
        tokens = [e for e in events if isinstance(e, TokenEvent)]
        assert [e for e in events if isinstance(e, DoneEvent)]
        results.append(([e.token for e in tokens], [e.logprob for e in tokens]))
    return results


def test_native_steps_give_the_torch_paths_tokens_and_logprobs(pipe, monkeypatch):
    calls = {"native": 0}
    step = kv_cache.CacheView.attend_step_native

    def counting(self, *args, **kwargs):
        y = step(self, *args, **kwargs)
        calls["native"] += y is not None
        return y

    monkeypatch.setattr(kv_cache.CacheView, "attend_step_native", counting)
    prompts = [[2, 17, 33], [2, 5, 61, 8, 9, 40, 3], [2, 70, 11, 12, 13, 14, 15, 16, 17, 18, 19], [2, 90]]
    model = pipe.engine.model
    assert all(m.native_kernels for m in model.modules() if hasattr(m, "native_kernels"))  # int8: on
    native = _generate(pipe, prompts, 20)
    assert calls["native"] > 0
    _switch(model, False)
    try:
        calls["native"] = 0
        torch_path = _generate(pipe, prompts, 20)
        assert calls["native"] == 0
    finally:
        _switch(model, True)
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(native, torch_path):
        assert tokens == want_tokens
        assert torch.allclose(torch.tensor(logprobs), torch.tensor(want_logprobs), rtol=1e-4, atol=1e-5)


def test_a_sequence_joining_mid_generation_matches_running_alone(pipe):
    """The step plan's rows and masks for slots at different lengths, one of them new."""
    params = pipe.parameters({"max_new_tokens": 12, "ignore_eos": True})
    alone = [e.token for e in pipe.engine.submit([2, 44, 45, 46], params) if isinstance(e, TokenEvent)]
    first = pipe.engine.submit([2, 7, 8], pipe.parameters({"max_new_tokens": 30, "ignore_eos": True}))
    events = iter(first)
    for _ in range(6):  # the first is decoding when the second joins
        next(events)
    joined = [e.token for e in pipe.engine.submit([2, 44, 45, 46], params) if isinstance(e, TokenEvent)]
    list(events)
    assert joined == alone


def _operands(B=2, H=4, Hkv=1, D=8, S=3, C=6, length=4):
    return dict(qkv=torch.randn(B, 1, (H + 2 * Hkv) * D), qk_scale=torch.randn(H + Hkv, D), eps=1e-6,
                cos=torch.randn(B, D), sin_signed=torch.randn(B, D), cache_k=torch.zeros(S, Hkv, C, D),
                cache_v=torch.zeros(S, Hkv, C, D), rows=torch.tensor([0, C * Hkv + 1]), slots=torch.tensor([0, 1]),
                length=length, bias=None)


@pytest.mark.parametrize("change, message", [
    (dict(slots=torch.tensor([0, 7])), "slot is outside"),
    (dict(rows=torch.tensor([0, 10_000])), "write row is outside"),
    (dict(length=99), "length must be within"),
    (dict(qkv=torch.randn(2, 1, 5)), r"qkv must be \[B, 1"),
    (dict(bias=torch.zeros(3)), "bias must be"),
    (dict(cache_v=torch.zeros(3, 1, 6, 8).double()), "float32"),
])
def test_operands_the_kernel_cannot_take_are_refused_with_a_reason(change, message):
    operands = {**_operands(), **change}
    with torch.inference_mode(), pytest.raises(RuntimeError, match=message):
        torch.ops.pipeserve.decode_attention(*operands.values())
