"""The native RMSNorm (kernels/rms_norm.cpp through layers/norms.py) against torch.rms_norm:
the same values to float32 rounding, rows independent of their batch, the in-place residual add,
torch's path wherever the kernel does not apply, and clear errors for tensors it cannot take."""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from native_kernels import require_native_kernels
from pipeserve.kernels import library
from pipeserve.layers import norms


@pytest.fixture(scope="module", autouse=True)
def kernels():
    require_native_kernels()


def _reference(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """In float64: what both float32 computations approximate."""
    x64 = x.double()
    return (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * scale.double()).float()


def _ulps(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest difference in units of float32's rounding of the reference's magnitude."""
    spacing = reference.abs().clamp_min(1e-30) * torch.finfo(torch.float32).eps
    return ((ours.double() - reference.double()).abs() / spacing.double()).max().item()


@pytest.mark.parametrize("shape", [(1, 1, 640), (3, 640), (2, 37, 640), (5, 17), (1, 1, 1)])
def test_rms_norm_matches_torch_to_rounding(shape):
    torch.manual_seed(0)
    x, scale = torch.randn(shape) * 20, torch.randn(shape[-1])
    with torch.inference_mode():
        ours = torch.ops.pipeserve.rms_norm(x, scale, 1e-6)
        theirs = F.rms_norm(x, (shape[-1],), scale, 1e-6)
    reference = _reference(x, scale, 1e-6)
    assert ours.shape == x.shape and ours.dtype == torch.float32
    # each of the two is a few roundings from the float64 result, as close as torch is
    assert _ulps(ours, reference) <= 4
    assert _ulps(theirs, reference) <= 4
    assert (ours - theirs).abs().max().item() <= 1e-5 * theirs.abs().max().item()


def test_per_group_scale_on_a_strided_view_as_gemmas_query_and_key_norm():
    """[B, T, H + Hkv, D] cut from the fused q/k/v projection: rows are not contiguous."""
    torch.manual_seed(1)
    qkv = torch.randn(2, 3, 4 + 2 * 2, 64) * 5
    qk = qkv[:, :, :6]
    scale = torch.randn(6, 64)
    with torch.inference_mode():
        ours = norms.rms_norm(qk, scale, 1e-6)
        theirs = F.rms_norm(qk, (64,), None, 1e-6) * scale
    assert ours.is_contiguous() and ours.shape == qk.shape
    assert _ulps(ours, _reference(qk, torch.ones(64), 1e-6) * scale) <= 6
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_a_rows_result_is_the_same_in_any_batch_and_thread_count():
    torch.manual_seed(2)
    x, scale = torch.randn(600, 640), torch.randn(640)  # past one thread's share: threaded
    with torch.inference_mode():
        whole = torch.ops.pipeserve.rms_norm(x, scale, 1e-6)
        assert torch.equal(torch.ops.pipeserve.rms_norm(x[123:124], scale, 1e-6), whole[123:124])
        seen = {}
        worker = threading.Thread(target=lambda: seen.update(y=torch.ops.pipeserve.rms_norm(x, scale, 1e-6)))
        worker.start()  # a new thread computes on one thread (compute.py)
        worker.join()
    assert torch.equal(seen["y"], whole)


def test_add_rms_norm_adds_the_normed_tensor_in_place_and_norms_the_sum():
    torch.manual_seed(3)
    x, y = torch.randn(2, 5, 640) * 3, torch.randn(2, 5, 640) * 40
    post, pre = torch.randn(640), torch.randn(640)
    with torch.inference_mode():
        want_x = x + F.rms_norm(y, (640,), post, 1e-6)
        want = F.rms_norm(want_x, (640,), pre, 1e-6)
        inplace = x.clone()
        got = norms.add_rms_norm_(inplace, y, post, 1e-6, pre)
        assert torch.allclose(inplace, want_x, rtol=1e-6, atol=1e-5)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
        # the returned norm is the norm of the updated x, exactly as a separate call makes it
        assert torch.equal(got, norms.rms_norm(inplace, pre, 1e-6))
        again = x.clone()
        assert norms.add_rms_norm_(again, y, post, 1e-6) is None
        assert torch.equal(again, inplace)


def test_torch_path_where_the_kernel_does_not_apply(monkeypatch):
    torch.manual_seed(4)
    x, scale = torch.randn(3, 64), torch.randn(64)
    low = x.bfloat16()
    with torch.inference_mode():  # bfloat16: torch's float32 arithmetic, cast back, bit for bit
        assert torch.equal(norms.rms_norm(low, scale, 1e-6), F.rms_norm(low.float(), (64,), scale, 1e-6).bfloat16())
    wants_grad = x.clone().requires_grad_()
    out = norms.rms_norm(wants_grad, scale, 1e-6)
    out.sum().backward()  # autograd: torch's operators
    assert wants_grad.grad is not None and torch.equal(out.detach(), F.rms_norm(x, (64,), scale, 1e-6))
    monkeypatch.setattr(library, "available", lambda: False)  # kernels not built on this machine
    with torch.inference_mode():
        assert torch.equal(norms.rms_norm(x, scale, 1e-6), F.rms_norm(x, (64,), scale, 1e-6))
        target = x.clone()
        assert norms.add_rms_norm_(target, x, scale, 1e-6) is None
        assert torch.equal(target, x + F.rms_norm(x, (64,), scale, 1e-6))


@pytest.mark.parametrize("call, message", [
    (lambda: torch.ops.pipeserve.rms_norm(torch.randn(2, 8).double(), torch.ones(8), 1e-6), "float32"),
    (lambda: torch.ops.pipeserve.rms_norm(torch.randn(8, 2).t(), torch.ones(8), 1e-6), "contiguous last"),
    (lambda: torch.ops.pipeserve.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-6), "7 values for rows of 8"),
    (lambda: torch.ops.pipeserve.rms_norm(torch.randn(2, 3, 8), torch.ones(2, 8), 1e-6), r"\[D\] or"),
    (lambda: torch.ops.pipeserve.add_rms_norm_(torch.randn(2, 8), torch.randn(3, 8), torch.ones(8), 1e-6),
     "one shape"),
])
def test_tensors_the_kernel_cannot_take_are_refused_with_a_reason(call, message):
    with torch.inference_mode(), pytest.raises(RuntimeError, match=message):
        call()


def test_quantized_gemma_norms_natively_and_the_float32_path_keeps_torchs_arithmetic(tmp_path):
    """The "native_kernels" pass: int8 and grouped Gemma switch every norm, float32 none (its
    logits are transformers', bit for bit in the norms); the switch changes the logits by
    rounding only."""
    from generation_checkpoints import build
    from harness import load_pipeline

    build("gemma3", tmp_path)
    ids = torch.tensor([[2, 17, 33, 5, 61, 8]])
    switches = {}
    for name, options in [("float32", {}), ("int8", {"load_in_8bit": True})]:
        pipe = load_pipeline(tmp_path, **options)
        model = pipe.engine.model
        switches[name] = {m.native_kernels for m in model.modules() if hasattr(m, "native_kernels")}
        with torch.inference_mode():
            logits = model(ids)
            for module in model.modules():
                if hasattr(module, "native_kernels"):
                    module.native_kernels = False
            on_torch = model(ids)
        pipe.close()
        if name == "int8":
            assert not torch.equal(logits, on_torch)  # the kernel ran
            assert torch.allclose(logits, on_torch, rtol=1e-4, atol=1e-4)
    assert switches == {"float32": {False}, "int8": {True}}
