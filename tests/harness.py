"""The parity harness every family reuses.

A test builds a tiny random checkpoint with transformers, saves it with save_pretrained to a
temp dir (plus tokenizer / processor files), loads it through pipeserve's real loading path,
and compares logits (max abs diff <= PARITY_ATOL in float32) and final pipeline outputs.

transformers initialises every bias to 0 and every norm weight to 1, so a family that ignored
a LayerNorm's affine, a bias, or swapped a norm's weight and bias would pass parity on a freshly
initialised model. perturb_parameters() moves every float parameter (and the float buffers a
checkpoint carries, e.g. batch-norm statistics) off those identities, and save_checkpoint()
refuses a model that still has a constant float tensor.
"""
from __future__ import annotations

import threading

from pathlib import Path
from typing import Any

import torch

PARITY_ATOL = 1e-4

# Spread of the perturbation added to 1-D / 0-D / constant tensors: norm weights land in about
# 1 +- 0.2, biases in about +- 0.2, large enough that dropping one moves logits by ~1e-1 (1000x
# PARITY_ATOL) and small enough to keep activations in the range real checkpoints have.
PERTURBATION_STD = 0.2


def _persistent_buffers(model) -> dict[str, torch.Tensor]:
    """The float buffers that go into the checkpoint (and that transformers reads back)."""
    saved = set(model.state_dict())
    return {name: b for name, b in model.named_buffers() if name in saved and b.is_floating_point()}


def perturb_parameters(model, seed: int = 0) -> None:
    """Moves every float parameter that transformers initialises to a constant (biases at 0,
    norm weights at 1, any other constant tensor) and every saved float buffer to seeded random
    values, in place. Random 2-D weights are left as they are. Batch-norm variances stay positive."""
    generator = torch.Generator().manual_seed(seed)

    def noise(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t.dtype)

    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.is_floating_point() and (p.dim() <= 1 or _is_constant(p)):
                p.add_(noise(p) * PERTURBATION_STD)
        for name, b in _persistent_buffers(model).items():
            if name.endswith("running_var"):
                b.mul_(torch.exp(noise(b) * 0.5))
            else:
                b.add_(noise(b) * PERTURBATION_STD)
    assert_no_constant_parameters(model)


def _is_constant(t: torch.Tensor) -> bool:
    return t.numel() > 1 and bool((t == t.reshape(-1)[0]).all())


def assert_no_constant_parameters(model) -> None:
    """Fails on any float parameter or saved float buffer whose elements are all equal: such a
    tensor cannot tell a correct family from one that ignores it."""
    tensors = dict(model.named_parameters())
    tensors.update(_persistent_buffers(model))
    constant = [name for name, t in tensors.items() if t.is_floating_point() and _is_constant(t)]
    assert not constant, f"constant float tensors in the parity checkpoint (perturb them): {constant}"


def save_checkpoint(model, directory: Path, *extras: Any, perturb: bool = True, seed: int = 0) -> Path:
    """save_pretrained the model (safetensors) and any tokenizer/processor beside it. Perturbs the
    model's constant-initialised parameters first (in place, so the caller's model stays the
    oracle of what was saved) unless perturb=False, and refuses a model with constant tensors."""
    if perturb:
        perturb_parameters(model, seed)
    assert_no_constant_parameters(model)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    for extra in extras:
        extra.save_pretrained(directory)
    return directory


def load_pipeline(directory: Path, task: str | None = None, **options: Any):
    """Loads `directory` exactly as LoadModel does (hub.resolve -> loading.load_pipeline)."""
    from pipeserve.checkpoints.hub import resolve
    from pipeserve.runtime.loading import load_pipeline as _load
    from pipeserve.pipelines.base import LoadOptions

    return _load(resolve(str(directory)), LoadOptions(**options), task)


def assert_close(ours: torch.Tensor, reference: torch.Tensor, atol: float = PARITY_ATOL) -> None:
    ours = ours.detach().float().cpu()
    reference = reference.detach().float().cpu()
    assert ours.shape == reference.shape, f"shape {tuple(ours.shape)} != reference {tuple(reference.shape)}"
    diff = (ours - reference).abs().max().item()
    assert diff <= atol, f"max |ours - reference| = {diff:.3g} > {atol}"


def reduced_precision_tolerance(reference_low: torch.Tensor, reference_fp32: torch.Tensor,
                                dtype: torch.dtype) -> float:
    """The tolerance for comparing our `dtype` output with transformers' run in the same dtype.

    Derivation: u = finfo(dtype).eps / 2 is the unit roundoff (2^-8 for bfloat16, 2^-11 for
    float16). transformers' own rounding error is measured, noise = max|reference_low -
    reference_fp32|. Our kernels round at other points (fused / packed linears, float32
    softmax), so our error is a different sample of the same size; by the triangle inequality
    |ours - reference_low| <= |ours - fp32| + noise <= 2 * noise when our error is no larger
    than theirs. Each side's final rounding of the output adds up to u * max|y|, hence
    tol = 2 * noise + 2 * u * max|y|. The caller checks that tol is small against the spread of
    the reference (so a constant or all-zero output cannot pass)."""
    reference_low = reference_low.detach().float().cpu()
    reference_fp32 = reference_fp32.detach().float().cpu()
    unit_roundoff = torch.finfo(dtype).eps / 2
    noise = (reference_low - reference_fp32).abs().max().item()
    return 2 * noise + 2 * unit_roundoff * reference_fp32.abs().max().item()


def assert_close_in_precision(ours: torch.Tensor, reference_low: torch.Tensor, reference_fp32: torch.Tensor,
                              dtype: torch.dtype) -> float:
    """ours (run in `dtype`) against transformers run in `dtype` on the same weights, within
    reduced_precision_tolerance; also no further from the float32 result than that. Fails when
    the tolerance is not below a tenth of the reference's spread: then the check could not tell
    a right answer from a constant one. Returns the tolerance used."""
    tol = reduced_precision_tolerance(reference_low, reference_fp32, dtype)
    spread = (reference_fp32.max() - reference_fp32.min()).item()
    assert tol < 0.1 * spread, f"tolerance {tol:.3g} is not small against the reference spread {spread:.3g}"
    assert_close(ours, reference_low, atol=tol)
    assert_close(ours, reference_fp32, atol=tol)
    return tol


def assert_same_greedy_tokens(ours: list[int], reference: list[int], reference_scores: list[torch.Tensor],
                              tol: float, at_least: int) -> None:
    """Greedy tokens in reduced precision: equal to the reference's, except that after a step where
    the reference's top-2 logit margin is within 2 * tol (a tie at this precision, where either
    token is right) the rest may differ. `reference_scores[i]` holds the reference's logits at
    step i; at least `at_least` leading tokens must be compared."""
    assert len(ours) == len(reference), f"{len(ours)} tokens != reference {len(reference)}"
    for i, (a, b) in enumerate(zip(ours, reference)):
        if a != b:
            top = reference_scores[i].float().reshape(-1).topk(2).values
            margin = (top[0] - top[1]).item()
            assert margin <= 2 * tol, f"token {i}: ours {a} != reference {b} with a clear margin {margin:.3g} > {2 * tol:.3g}"
            assert i >= at_least, f"only {i} tokens agree before a tie; need {at_least} to test anything"
            return


def run_together(calls: list) -> list:
    """Runs the calls at once from threads (a barrier starts them together) -> their results;
    a call's exception is re-raised in the caller's thread."""
    results: list = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(i):
        start.wait()
        try:
            results[i] = calls[i]()
        except BaseException as exc:  # re-raised below, in the test's thread
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results
