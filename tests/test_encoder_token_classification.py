"""token-classification parity with transformers.pipeline on tiny random bert, roberta,
xlm-roberta and distilbert checkpoints: every aggregation strategy, ignore_labels, stride
windows, entity groups, words and character offsets, batched texts; bad input."""
from __future__ import annotations

import pytest

from encoder_checkpoints import FAMILIES, build_checkpoint
from harness import load_pipeline

TEXTS = ["My name is Wolfgang and I live in Berlin.", "Sarah works at Acme Corporation!", "Ünïcode wörds 3.14",
         "x"]


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    import warnings

    from transformers import pipeline

    warnings.simplefilter("ignore")
    directory, model, tokenizer = build_checkpoint(request.param, "token_classification",
                                                   tmp_path_factory.mktemp(request.param))
    return load_pipeline(directory), pipeline("token-classification", model=model, tokenizer=tokenizer)


def _same(ours, reference, strategy):
    assert len(ours) == len(reference), (ours, reference)
    for entity, ref in zip(ours, reference, strict=True):
        assert entity.entity == (ref["entity"] if strategy == "none" else ref["entity_group"])
        assert abs(entity.score - float(ref["score"])) <= 1e-4
        assert (entity.word, entity.start, entity.end) == (ref["word"], ref["start"], ref["end"])
        assert entity.index == (ref["index"] if strategy == "none" else None)


@pytest.mark.parametrize("strategy", ["none", "simple", "first", "average", "max"])
def test_aggregation_strategies_match(checkpoint, strategy):
    ours, reference = checkpoint
    got = ours.classify(TEXTS, {"aggregation_strategy": strategy})
    expected = reference(TEXTS, aggregation_strategy=strategy, batch_size=4)
    for result, exp in zip(got, expected, strict=True):
        _same(result, exp, strategy)


@pytest.mark.parametrize("strategy", ["none", "simple"])
def test_ignore_labels(checkpoint, strategy):
    ours, reference = checkpoint
    for labels in (["B-PER", "I-PER"], ["XYZ"]):
        got = ours.classify(TEXTS, {"aggregation_strategy": strategy, "ignore_labels": labels})
        for text, result in zip(TEXTS, got, strict=True):
            _same(result, reference(text, aggregation_strategy=strategy, ignore_labels=labels), strategy)


def test_offsets_point_into_the_original_text(checkpoint):
    ours, _ = checkpoint
    for text, entities in zip(TEXTS, ours.classify(TEXTS, {"ignore_labels": ["XYZ"]}), strict=True):
        assert entities, "with nothing ignored every token is returned"
        for entity in entities:
            assert 0 <= entity.start <= entity.end <= len(text)  # byte-level "Ġ" tokens are zero-width


@pytest.mark.parametrize("strategy", ["simple", "first", "max"])
def test_long_text_with_stride_matches(checkpoint, strategy):
    ours, reference = checkpoint
    text = " ".join(TEXTS * 4)
    got = ours.classify([text], {"aggregation_strategy": strategy, "stride": 8, "ignore_labels": ["XYZ"]})[0]
    _same(got, reference(text, aggregation_strategy=strategy, stride=8, ignore_labels=["XYZ"]), strategy)


def test_long_text_is_truncated_as_transformers_does(checkpoint):
    ours, reference = checkpoint
    text = " ".join(TEXTS * 4)
    got = ours.classify([text], {"ignore_labels": ["XYZ"]})[0]
    _same(got, reference(text, ignore_labels=["XYZ"]), "none")


def test_bad_input(checkpoint):
    from pipeserve.errors import InvalidInput, InvalidParameter

    ours, _ = checkpoint
    with pytest.raises(InvalidInput, match="empty"):
        ours.classify(["  "])
    with pytest.raises(InvalidParameter, match="aggregation_strategy"):
        ours.classify(["a"], {"aggregation_strategy": "longest"})
    with pytest.raises(InvalidParameter, match="stride must be less"):
        ours.classify(["a"], {"aggregation_strategy": "simple", "stride": 40})
    with pytest.raises(InvalidParameter, match="aggregation_strategy other than none"):
        ours.classify(["a"], {"stride": 4})
    with pytest.raises(InvalidParameter, match="non-negative"):
        ours.classify(["a"], {"aggregation_strategy": "simple", "stride": -1})
