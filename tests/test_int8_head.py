"""The int8-screened head (layers/int8_head.py): greedy text generation's output projection
screened with int8 weights gives the float32 argmax, on random heads (outlier rows, masks, flat
and peaked logits) and on the real Gemma 3 270M head over teacher-forced greedy steps."""
from __future__ import annotations

import math
from typing import Callable

import pytest
import torch

from pipeserve.layers import int8_head

pytestmark = pytest.mark.skipif(not int8_head.int8_screen_available(torch.ones(1, 1)),
                                reason="no native bfloat16 or no int8 kernel on this CPU: the head is not used")

VOCAB, DIM = 6000, 96


def _weight(seed: int = 0, outliers: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(VOCAB, DIM, generator=g) * 0.05
    if outliers:
        # one large weight in some rows: those rows get a coarse int8 scale (large rounding)
        rows = torch.arange(0, VOCAB, 7)
        weight[rows, rows % DIM] *= 40
    return weight


def _hidden(rows: int, scale: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, DIM, generator=g) * scale


def _no_mask(scores: torch.Tensor) -> None:
    pass


@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("scale", [3.0, 30.0, 300.0])  # flat to sharply peaked logits
def test_choice_and_maximum_equal_float32(outliers, rows, scale):
    weight = _weight(outliers=outliers)
    head = int8_head.Int8ScreenedHead(weight, max_rescored=VOCAB)
    for seed in range(5):
        h = _hidden(rows, scale, seed=seed)
        exact = h @ weight.T
        got = head.scores(h, _no_mask, lambda x: x @ weight.T)
        assert torch.equal(got.argmax(-1), exact.argmax(-1))
        noise = 1e-6 * exact.abs().max().item() + 1e-6  # float32 summation order
        torch.testing.assert_close(got.amax(-1), exact.amax(-1), rtol=0, atol=noise)
        # every unrescored score is below the maximum, so no wrong token can win
        assert (got <= got.amax(-1, keepdim=True)).all()


def test_the_per_row_bound_holds():
    """|float32 logit - screened| <= the bound the head computes, on every row and input."""
    weight = _weight(outliers=True)
    head = int8_head.Int8ScreenedHead(weight)
    for seed in range(10):
        h = _hidden(2, 20.0, seed=seed)
        h[:, 3] = 400.0  # a large activation: a coarse per-row step
        exact = (h.double() @ weight.double().T)
        screened, quantization = head.project(h)
        screened = screened.double()
        h_norm = h.norm(dim=1, keepdim=True).double()
        quantization = quantization.double()
        bound = (head.rounding_norms.double()[None, :] * h_norm
                 + head.row_norm * (quantization + 2.0 ** -12 * h_norm + 2.0 ** -20 * (h_norm + quantization)))
        assert ((exact - screened).abs() <= bound).all()
        # and the bound is not vacuous: within a few percent of the logits' spread
        assert bound.max() < 0.1 * (exact.max() - exact.min())


def test_a_row_chooses_the_same_token_in_any_batch():
    """Scores of a row screened alone and among other rows: bitwise equal (per-row activation
    scales, integer sums), so the rescored set and the choice are too."""
    weight = _weight(outliers=True)
    head = int8_head.Int8ScreenedHead(weight, max_rescored=VOCAB)
    crowd = _hidden(12, 30.0) * torch.logspace(-1, 1, 12)[:, None]
    alone = torch.cat([head.project(crowd[i:i + 1])[0] for i in range(12)])
    assert torch.equal(head.project(crowd)[0], alone)
    exact = lambda x: x @ weight.T  # noqa: E731
    chosen = head.scores(crowd, _no_mask, exact).argmax(-1)
    assert chosen.tolist() == [head.scores(crowd[i:i + 1], _no_mask, exact).argmax().item() for i in range(12)]


def test_masked_tokens_stay_masked_and_a_fully_masked_row_is_fine():
    weight = _weight()
    head = int8_head.Int8ScreenedHead(weight, max_rescored=VOCAB)
    h = _hidden(2, 30.0)
    exact = h @ weight.T
    best = exact[0].argmax().item()

    def mask(scores):
        scores[0, best] = -math.inf  # the float32 winner is suppressed: the runner-up must win
        scores[1, :] = -math.inf

    got = head.scores(h, mask, lambda x: x @ weight.T)
    expected = exact.clone()
    mask(expected)
    assert got[0].argmax().item() == expected[0].argmax().item()
    assert got[0, best] == -math.inf and torch.isinf(got[1]).all()
    assert not torch.isnan(got).any()


def _flat_head() -> tuple[torch.Tensor, int8_head.Int8ScreenedHead]:
    """Rows that differ by less than int8 rounding, so every row is a candidate, under a head
    that rescores at most 10 per row: every screened step falls back to the float32 projection."""
    weight = _weight(seed=2) * 1e-3 + torch.linspace(0.5, 1.0, DIM)[None, :]
    return weight, int8_head.Int8ScreenedHead(weight, max_rescored=10)


def _counting_projection(weight: torch.Tensor, calls: list) -> Callable[[torch.Tensor], torch.Tensor]:
    """The float32 projection, appending to `calls` each time it runs."""
    def exact(x):
        calls.append(1)
        return x @ weight.T
    return exact


def test_too_many_candidates_take_the_float32_projection_and_later_probe_again():
    weight, head = _flat_head()
    flat = _hidden(1, 1.0)
    calls = []
    exact = _counting_projection(weight, calls)
    for _ in range(40):
        torch.testing.assert_close(head.scores(flat, _no_mask, exact), flat @ weight.T)
    assert len(calls) == 40 and head._fallback_rate > 0.5
    head.max_rescored = VOCAB  # screening pays again: the next probe succeeds and screening resumes
    for _ in range(3 * head.PROBE_EVERY):
        head.scores(flat, _no_mask, exact)
    assert head._fallback_rate < 0.5


def test_memory_is_counted_as_screening():
    from pipeserve.layers.memory import module_memory

    weight = _weight()
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding.from_pretrained(weight)
    model.head = int8_head.Int8ScreenedHead(model.embed.weight)
    usage = module_memory([model])
    assert usage["weights"] == weight.numel() * 4  # the shared float32 weight once
    assert usage["screening"] >= weight.numel()  # the int8 copy (+ scales, norms)
    # per token: a scale, a zero point, a rounding norm, its screen position and back
    assert usage["screening"] <= weight.numel() + VOCAB * (4 + 8 + 4 + 4 + 4) + 4 * (VOCAB // 64 + 1)


@pytest.mark.slow
def test_real_gemma_greedy_choices_equal_float32():
    """Teacher-forced over the float path's own greedy tokens on several prompts: the screen's
    choice is the float32 head's on every step."""
    from harness import load_pipeline
    from pipeserve.checkpoints.embedded import embedded_model_dir

    [path] = embedded_model_dir("text-generation").glob("*.gguf")
    pipe = load_pipeline(path, load_in_8bit=False)
    try:
        model = pipe.model
        head = model.verified_head
        assert isinstance(head, int8_head.Int8ScreenedHead)
        prompts = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
                   "Once upon a time, in a small village by the sea, there lived"]
        steps = 0
        for prompt in prompts:
            [result] = pipe.generate([prompt], {"max_new_tokens": 32, "min_new_tokens": 32})
            tokens = [t.token for t in result.sequences[0].tokens]
            ids = torch.tensor([pipe.encode(prompt) + tokens])
            with torch.no_grad():
                hidden = model.hidden(ids)[0, -33:-1]
                exact = model.lm_head(hidden).float()
            assert exact.argmax(-1).tolist() == tokens
            for i in range(32):
                got = head.scores(hidden[i:i + 1], _no_mask, model.lm_head)
                assert got.argmax().item() == tokens[i]
                steps += 1
            # a decoding step's tokens without dense scores, 16 rows at once (the 16-stream path)
            assert head.choose(hidden[:16], _no_mask, model.lm_head).tolist() == tokens[:16]
        assert head._fallback_rate < 0.5  # the screen, not the float32 fallback, made the choices
        assert steps == 96
    finally:
        pipe.close()


def _rescored_by_full_bounds(scores, rounding, alpha, beta, margin):
    """The rows to rescore computed over every score (what screen_search avoids): [R, V] bool."""
    spread = alpha[:, None] * rounding[None, :] + beta[:, None]
    best = (scores - spread).amax(dim=1, keepdim=True).clamp(min=-1e30)  # a fully masked row: none
    return (scores + spread) >= best - margin[:, None]


@pytest.mark.parametrize("vocab", [64 * 50, 64 * 50 + 37])  # whole blocks, and a short last block
@pytest.mark.parametrize("sort", [True, False])
def test_the_block_search_picks_exactly_the_rows_the_full_bound_picks(vocab, sort):
    from pipeserve.layers.screen_search import block_maxima, rows_to_rescore

    g = torch.Generator().manual_seed(vocab + sort)
    rows = 6
    rounding = torch.rand(vocab, generator=g) ** 4 * 0.05  # a few large norms, as outlier rows give
    if sort:
        rounding = rounding.sort().values
    scores = torch.randn(rows, vocab, generator=g) * 3
    scores[1] *= 0.01  # nearly flat: many rows within the bound
    scores[2, 100:110] = scores[2].max() + 0.001 * torch.arange(10)  # near-ties at the top
    scores[3, torch.randint(0, vocab, (vocab // 3,), generator=g)] = -math.inf  # masked tokens
    scores[3, scores[3].argmax()] = -math.inf  # ... the top one among them
    scores[4] = -math.inf  # a fully masked row
    scores[5, -1] = 50.0  # the top in the last (maybe short) block
    alpha = torch.rand(rows, generator=g) * 40
    beta = torch.rand(rows, generator=g) * 0.1
    margin = torch.tensor([0.0, 0.0, 0.5, 0.0, 1.0, 2.0])
    r, p = rows_to_rescore(scores, rounding, block_maxima(rounding), alpha, beta, margin)
    got = torch.zeros(rows, vocab, dtype=torch.bool)
    got[r, p] = True
    assert r.shape[0] == got.sum(), "no row returned twice"
    expected = _rescored_by_full_bounds(scores, rounding, alpha, beta, margin)
    assert torch.equal(got, expected)
    assert not got[4].any() and got[1].sum() > 100


def _eos_style_mask(entries):
    def mask(scores):
        for row, ids in entries:
            scores[row, ids] = -math.inf
    mask.entries = entries
    return mask


def _listed_and_unlisted_masks(logits: torch.Tensor):
    """-> (entries, (a mask that lists them as generation_steps.eos_masks does, the same mask
    without the list), `logits` masked): rows 0 and 2 lose their top tokens (and token 5)."""
    entries = [(0, [int(logits[0].argmax()), 5]), (2, [int(i) for i in logits[2].topk(3).indices])]
    listed = _eos_style_mask(entries)
    expected = logits.clone()
    listed(expected)

    def unlisted(scores):
        listed(scores)

    return entries, (listed, unlisted), expected


def test_a_mask_that_lists_its_entries_and_one_that_does_not_choose_alike():
    weight = _weight(outliers=True)
    head = int8_head.Int8ScreenedHead(weight, max_rescored=VOCAB)
    h = _hidden(3, 30.0)
    entries, masks, expected = _listed_and_unlisted_masks(h @ weight.T)
    for mask in masks:
        got = head.scores(h, mask, lambda x: x @ weight.T)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
        for row, ids in entries:
            assert (got[row, ids] == -math.inf).all()


def test_near_ties_below_the_screens_resolution_choose_as_float32():
    """Tokens whose logits differ by far less than int8 rounding (but more than float32 noise):
    both are rescored, and the float32 order decides."""
    g = torch.Generator().manual_seed(5)
    weight = _weight()
    base = torch.arange(0, VOCAB, VOCAB // 40)
    twins = base + 1
    # a twin is its pair's row scaled by 1 +- 1e-4: the logits differ by 1e-4 relative, a hundred
    # times float32's noise and a hundredth of int8's rounding; the sign decides who wins
    sign = torch.randint(0, 2, (len(base), 1), generator=g) * 2 - 1
    weight[twins] = weight[base] * (1 + 1e-4 * sign)
    head = int8_head.Int8ScreenedHead(weight, max_rescored=VOCAB)
    h = weight[base] * 400  # each row peaks at one of the twin pairs
    exact = (h.double() @ weight.double().T)
    gap = (exact[torch.arange(len(base)), base] - exact[torch.arange(len(base)), twins]).abs()
    assert (gap > 5e-5 * exact[torch.arange(len(base)), base].abs()).all()
    got = head.scores(h, _no_mask, lambda x: x @ weight.T)
    assert torch.equal(got.argmax(-1), exact.argmax(-1))
    winners = exact.argmax(-1)
    assert ((winners == base) | (winners == twins)).all()  # every row's top is its pair
    assert (winners == base).any() and (winners == twins).any()


@pytest.mark.parametrize("weight_scale", [1e-4, 1.0, 1e3])
@pytest.mark.parametrize("hidden_scale", [1e-3, 1.0, 1e4])
def test_the_bound_holds_and_the_choice_is_exact_at_extreme_scales(weight_scale, hidden_scale):
    weight = _weight(seed=3, outliers=True) * weight_scale
    head = int8_head.Int8ScreenedHead(weight, max_rescored=VOCAB)
    h = _hidden(3, hidden_scale, seed=4)
    h[0, 7] *= 300  # one huge activation: a coarse per-row step
    h[2] = weight[11] * hidden_scale * 50 / weight_scale  # a sharply peaked row
    exact = h.double() @ weight.double().T
    screened, quantization = head.project(h)
    h_norm = h.norm(dim=1, keepdim=True).double()
    quantization = quantization.double()
    bound = (head.rounding_norms.double()[None, :] * h_norm
             + head.row_norm * (quantization + 2.0 ** -12 * h_norm + 2.0 ** -20 * (h_norm + quantization)))
    assert ((exact - screened.double()).abs() <= bound).all()
    got = head.scores(h, _no_mask, lambda x: x @ weight.T)
    assert torch.equal(got.argmax(-1), exact.argmax(-1))


def test_a_screen_in_slices_gives_the_sums_of_one_call():
    """The int8 screen packs the weight in slices (layers/int8_screen.py): integer sums make the
    scores of every slicing, and of a row alone or in a batch, bitwise the same."""
    from pipeserve.layers.int8_screen import Int8Screen
    from pipeserve.layers.quantization import quantize_per_channel

    q, scale = quantize_per_channel(_weight(outliers=True))
    whole, sliced = Int8Screen(q, scale, chunk_rows=VOCAB), Int8Screen(q, scale, chunk_rows=1024)
    assert len(sliced.bounds) == 6 and sliced.bounds[-1] == (5120, VOCAB)
    h = _hidden(5, 30.0)
    one, inverse_step, quantization = whole.project_scaled(h)
    many = sliced.project_scaled(h)
    assert torch.equal(one, many[0]) and torch.equal(inverse_step, many[1]) and torch.equal(quantization, many[2])
    assert torch.equal(sliced.project_scaled(h[3:4])[0], one[3:4])
