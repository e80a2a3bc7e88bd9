"""text-classification parity with transformers.pipeline on tiny random bert, roberta,
xlm-roberta and distilbert checkpoints: labels and scores (1e-4), function_to_apply, top_k
(legacy single label and explicit k), pairs, batched inputs with padding; bad input."""
from __future__ import annotations

import pytest

from encoder_checkpoints import FAMILIES, build_checkpoint
from harness import load_pipeline

TEXTS = ["Sarah lives in Paris, doesn't she?", "a", "The quick brown fox, in New York."]


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    from transformers import pipeline

    directory, model, tokenizer = build_checkpoint(request.param, "sequence_classification",
                                                   tmp_path_factory.mktemp(request.param))
    return request.param, load_pipeline(directory), pipeline("text-classification", model=model, tokenizer=tokenizer)


def _same(ours, reference):
    assert [label for label, _ in ours] == [r["label"] for r in reference]
    for (_, score), r in zip(ours, reference, strict=True):
        assert abs(score - r["score"]) <= 1e-4


@pytest.mark.parametrize("function", [None, "softmax", "sigmoid", "none"])
def test_labels_and_scores_match_batched(checkpoint, function):
    _, ours, reference = checkpoint
    kwargs = {} if function is None else {"function_to_apply": function}
    got = ours.classify(TEXTS, {"function_to_apply": function})
    for text, result in zip(TEXTS, got, strict=True):
        expected = reference(text, **kwargs)  # legacy shape: [best]
        _same(result, expected)
    # Batched through transformers with padding too.
    expected = reference(TEXTS, batch_size=3, **kwargs)
    for result, exp in zip(got, expected, strict=True):
        _same(result, [exp])


@pytest.mark.parametrize("top_k", [1, 2, 3, 10])
def test_top_k(checkpoint, top_k):
    _, ours, reference = checkpoint
    got = ours.classify(TEXTS, {"top_k": top_k})
    for text, result in zip(TEXTS, got, strict=True):
        _same(result, reference(text, top_k=top_k))


def test_text_pairs(checkpoint):
    from pipeserve.pipelines.text_classification import TextInput

    _, ours, reference = checkpoint
    inputs = [TextInput("Where is Paris?", "Paris is the capital of France."), TextInput("a", "b c")]
    got = ours.classify(inputs, {"top_k": 3})
    for item, result in zip(inputs, got, strict=True):
        _same(result, reference({"text": item.text, "text_pair": item.text_pair}, top_k=3))


def test_single_label_model_uses_sigmoid_and_regression_none(tmp_path):
    from transformers import pipeline

    for extra, name in [({"num_labels": 1}, "one"), ({"num_labels": 2, "problem_type": "regression"}, "regression"),
                        ({"num_labels": 3, "problem_type": "multi_label_classification"}, "multi")]:
        directory, model, tokenizer = build_checkpoint("bert", "sequence_classification", tmp_path / name, **extra)
        ours = load_pipeline(directory)
        reference = pipeline("text-classification", model=model, tokenizer=tokenizer)
        _same(ours.classify(TEXTS[:1], {"top_k": 5})[0], reference(TEXTS[0], top_k=5))


def test_bad_input(checkpoint):
    from pipeserve.errors import InputTooLarge, InvalidInput, InvalidParameter

    _, ours, _ = checkpoint
    with pytest.raises(InvalidInput, match="empty") as info:
        ours.classify([""])
    assert info.value.reason == "EMPTY_INPUT"
    with pytest.raises(InvalidParameter, match="top_k must be at least 1"):
        ours.classify(["a"], {"top_k": 0})
    with pytest.raises(InvalidParameter, match="top_k"):
        ours.classify(["a"], {"top_k": -3})
    with pytest.raises(InvalidParameter, match="function_to_apply"):
        ours.classify(["a"], {"function_to_apply": "relu"})
    long_text = "paris " * 200
    with pytest.raises(InputTooLarge, match="at most 40"):
        ours.classify([long_text])
    # The model loaded with truncation=true truncates to the maximum, as truncation=True does.
    assert len(ours.classify([long_text], {"truncation": True})[0]) == 1


def test_truncation_matches_transformers(tmp_path):
    from transformers import pipeline

    directory, model, tokenizer = build_checkpoint("roberta", "sequence_classification", tmp_path)
    ours = load_pipeline(directory, defaults={"truncation": True})
    reference = pipeline("text-classification", model=model, tokenizer=tokenizer)
    long_text = "Sarah lives in Paris. " * 30
    _same(ours.classify([long_text, "a"], {"top_k": 3})[0], reference(long_text, top_k=3, truncation=True))
