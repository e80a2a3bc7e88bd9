"""fill-mask parity with transformers.pipeline on tiny random bert, roberta, xlm-roberta and
distilbert checkpoints: tokens, scores (1e-4), token_str, sequences, top_k, targets (in and
out of the vocabulary), several masks, batched texts with padding; bad input."""
from __future__ import annotations

import pytest

from encoder_checkpoints import FAMILIES, build_checkpoint
from harness import load_pipeline


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    from transformers import pipeline

    directory, model, tokenizer = build_checkpoint(request.param, "masked_lm", tmp_path_factory.mktemp(request.param))
    mask = tokenizer.mask_token
    texts = [f"Sarah lives in {mask}.", f"The {mask} brown fox, doesn't it?", f"{mask}"]
    return load_pipeline(directory), pipeline("fill-mask", model=model, tokenizer=tokenizer), texts, mask


def _same(ours, reference):
    assert [(c.token, c.token_str, c.sequence) for c in ours] == \
        [(r["token"], r["token_str"], r["sequence"]) for r in reference]
    for c, r in zip(ours, reference, strict=True):
        assert abs(c.score - r["score"]) <= 1e-4


@pytest.mark.parametrize("top_k", [None, 1, 3])
def test_candidates_match_batched(checkpoint, top_k):
    ours, reference, texts, _ = checkpoint
    kwargs = {} if top_k is None else {"top_k": top_k}
    got = ours.fill(texts, {"top_k": top_k})
    expected = reference(texts, batch_size=3, **kwargs)
    for result, exp in zip(got, expected, strict=True):
        assert len(result) == 1
        _same(result[0], exp)


def test_several_masks(checkpoint):
    ours, reference, _, mask = checkpoint
    text = f"My name is {mask} and I live in {mask}."
    got = ours.fill([text], {"top_k": 3})[0]
    expected = reference(text, top_k=3)
    assert len(got) == len(expected) == 2
    for result, exp in zip(got, expected, strict=True):
        _same(result, exp)


def test_targets(checkpoint):
    ours, reference, texts, _ = checkpoint
    inside = reference.tokenizer.tokenize("Sarah lives in Paris")[:4]  # vocabulary entries
    assert len(inside) >= 3
    outside = ["Wolfgangxyz"]  # not in the vocabulary: its first token is used
    for targets in (inside, inside + outside):
        got = ours.fill(texts[:1], {"targets": targets, "top_k": 10})[0][0]
        _same(got, reference(texts[0], targets=targets, top_k=10))


def test_bad_input(checkpoint):
    from pipeserve.errors import InputTooLarge, InvalidInput, InvalidParameter

    ours, _, texts, mask = checkpoint
    with pytest.raises(InvalidInput, match="no mask token") as info:
        ours.fill(["Sarah lives in Paris."])
    assert info.value.reason == "MASK_MISSING"
    with pytest.raises(InvalidInput, match="empty"):
        ours.fill([""])
    with pytest.raises(InvalidParameter, match="top_k must be at least 1"):
        ours.fill(texts[:1], {"top_k": 0})
    with pytest.raises(InvalidParameter, match="tokenizes to nothing"):
        ours.fill(texts[:1], {"targets": [""]})
    with pytest.raises(InputTooLarge, match="at most 40"):
        ours.fill([f"{mask} " + "Paris is nice. " * 40])
