"""The CUDA tests' parity code (tests/device_parity.py) exercised on the CPU: the dtype-derived
tolerance, every family's bfloat16 parity against transformers (float32 truth and bfloat16
peer), greedy tokens in bfloat16, and the tie rule that lets two rounded runs part ways."""
from __future__ import annotations

import pytest
import torch

import device_parity as dp
from harness import PARITY_ATOL


def test_tolerance_follows_the_dtype_epsilon_the_depth_and_the_scale():
    assert dp.tolerance(torch.float32, 100.0, 12) == PARITY_ATOL
    half = dp.tolerance(torch.float16, 2.0, 2)
    assert half == pytest.approx(dp.SAFETY * 2 ** -10 * 4 * 2.0)
    # bfloat16 keeps 3 fewer mantissa bits than float16: 8x the bound
    assert dp.tolerance(torch.bfloat16, 2.0, 2) == pytest.approx(8 * half)
    assert dp.tolerance(torch.float16, 4.0, 2) == pytest.approx(2 * half)
    assert dp.tolerance(torch.float16, 2.0, 6) == pytest.approx(2 * half)  # depth + 2 layers of rounding


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = dp.CASES[name].build(tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(dp.CASES))
def test_bfloat16_parity_on_cpu(built, name):
    directory, reference = built(name)
    result = dp.logits_parity(dp.CASES[name], directory, reference, "cpu", torch.bfloat16)
    print(f"\nPARITY {result}")  # scripts/gpu-check --device cpu collects these lines
    result.check()
    # ours really ran in bfloat16: not float32-exact, and about as far from the truth as
    # transformers' own bfloat16 run
    assert result.vs_truth > PARITY_ATOL
    assert result.vs_truth <= 4 * result.peer_vs_truth + result.tol / 10


def test_bfloat16_greedy_tokens_on_cpu(built):
    from transformers import AutoTokenizer

    directory, reference = built("llama")
    equal = dp.greedy_parity(dp.CASES["llama"], directory, reference, AutoTokenizer.from_pretrained(directory),
                             "cpu", torch.bfloat16, new_tokens=12)
    assert equal >= 1


def test_greedy_tie_rule():
    logits = torch.tensor([0.0, 5.0, 4.99, 1.0])
    truth = lambda prefix: logits
    assert dp.assert_same_greedy([1, 2, 3], [1, 2, 3], truth, tol=0.0) == 3
    # they part at token 1, where the truth's candidates 1 and 2 are 0.01 apart: a tie for tol 0.01
    assert dp.assert_same_greedy([1, 1, 0], [1, 2, 3], truth, tol=0.01) == 1
    with pytest.raises(AssertionError, match="float32 logits are 0.01 apart"):
        dp.assert_same_greedy([1, 1, 0], [1, 2, 3], truth, tol=0.001)
    with pytest.raises(AssertionError, match="stops early"):
        dp.assert_same_greedy([1, 2], [1, 2, 3], truth, tol=1.0)


def test_parity_catches_a_wrong_model(built):
    """A perturbed weight is caught: the check is not vacuous at bfloat16's tolerance."""
    directory, reference = built("gpt2")
    case = dp.CASES["gpt2"]
    broken = dp.Case(case.name, case.depth, case.build, case.inputs,
                     ours=lambda m, x: case.ours(m, x) * 1.5, reference=case.reference)
    with pytest.raises(AssertionError, match="float32 truth"):
        dp.logits_parity(broken, directory, reference, "cpu", torch.bfloat16).check()
