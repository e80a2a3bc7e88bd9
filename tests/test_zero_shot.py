"""Zero-shot classification parity with transformers.pipeline on tiny random NLI checkpoints
(BART, BERT, RoBERTa, XLM-RoBERTa, DistilBERT), plus bad inputs."""
from __future__ import annotations

import pytest
import torch

from harness import assert_close, load_pipeline
from zero_shot_docqa_checkpoints import build_bart_nli, build_encoder_nli

from pipeserve.errors import InputTooLarge, InvalidInput, InvalidParameter
from pipeserve.pipelines.zero_shot_classification import MAX_CANDIDATE_LABELS, ZeroShotRequest

LABELS = ["sports", "politics", "cooking", "weather"]
TEXTS = [
    "I love playing football on weekends",
    "The election results were announced today.",
    "Quick!",
]
# Longer than every tiny tokenizer's model_max_length (40-48 tokens): the premise is truncated.
LONG_TEXT = " ".join(["The election results were announced today in the capital with the quick brown fox."] * 6)
FAMILIES = ["bart", "bert", "roberta", "xlm-roberta", "distilbert"]


@pytest.fixture(scope="module", params=FAMILIES)
def nli(request, tmp_path_factory):
    from transformers import pipeline

    directory = tmp_path_factory.mktemp(f"nli_{request.param}")
    if request.param == "bart":
        build_bart_nli(directory)
    else:
        build_encoder_nli(request.param, directory)
    oracle = pipeline("zero-shot-classification", model=str(directory))
    return request.param, directory, oracle, load_pipeline(directory)


def _check(ours, reference):
    assert [label for label, _ in ours.labels] == reference["labels"]
    for (_, score), ref_score in zip(ours.labels, reference["scores"], strict=True):
        assert abs(score - ref_score) <= 1e-4
    assert ours.sequence == reference["sequence"]


def test_logits_match_transformers(nli):
    family, directory, oracle, ours = nli
    pairs = [[t, f"This example is {l}."] for t in TEXTS for l in LABELS]
    encoded = oracle.tokenizer(pairs, padding=True, truncation="only_first", return_tensors="pt")
    with torch.no_grad():
        reference = oracle.model(**{k: encoded[k] for k in oracle.tokenizer.model_input_names}).logits
    rows = [r for t in TEXTS for r in ours.preprocess(ZeroShotRequest(t, tuple(LABELS)), ours.default_options)]
    assert_close(torch.from_numpy(ours.forward(rows)), reference)


@pytest.mark.parametrize("multi_label", [False, True])
def test_labels_and_scores_match(nli, multi_label):
    _, _, oracle, ours = nli
    for text in TEXTS + [LONG_TEXT]:
        reference = oracle(text, candidate_labels=LABELS, multi_label=multi_label)
        [result] = ours.classify([ZeroShotRequest(text, tuple(LABELS))], {"multi_label": multi_label})
        _check(result, reference)


def test_custom_template_and_batched_requests_equal_single(nli):
    _, _, oracle, ours = nli
    template = "The topic of this text is {}"
    requests = [ZeroShotRequest(t, tuple(LABELS[: 2 + i])) for i, t in enumerate(TEXTS)]
    batched = ours.classify(requests, {"hypothesis_template": template})
    for request, result in zip(requests, batched, strict=True):
        reference = oracle(request.sequence, candidate_labels=list(request.candidate_labels),
                           hypothesis_template=template)
        _check(result, reference)
        [single] = ours.classify([request], {"hypothesis_template": template})
        _check(single, reference)


def test_one_label_scores_entailment_against_contradiction(nli):
    # transformers scores a single label as multi_label does, whatever multi_label says.
    _, _, oracle, ours = nli
    reference = oracle(TEXTS[0], candidate_labels=["sports"])
    [result] = ours.classify([ZeroShotRequest(TEXTS[0], ("sports",))], {"multi_label": False})
    _check(result, reference)
    assert 0.0 < result.labels[0][1] < 1.0


def test_long_text_is_truncated_like_transformers_or_refused(nli):
    _, _, oracle, ours = nli
    assert len(oracle.tokenizer(LONG_TEXT)["input_ids"]) > ours.max_tokens
    rows = ours.preprocess(ZeroShotRequest(LONG_TEXT, ("sports",)), ours.default_options)
    assert len(rows[0]) == ours.max_tokens
    with pytest.raises(InputTooLarge, match=f"at most {ours.max_tokens}"):
        ours.classify([ZeroShotRequest(LONG_TEXT, ("sports",))], {"truncation": False})


def test_bad_inputs(nli):
    _, _, _, ours = nli
    cases = [
        (ZeroShotRequest(TEXTS[0], ()), {}, InvalidInput, "candidate_labels is empty"),
        (ZeroShotRequest(TEXTS[0], ("a", "b", "a")), {}, InvalidInput, "appears more than once"),
        (ZeroShotRequest(TEXTS[0], ("a", " ")), {}, InvalidInput, r"candidate_labels\[1\] is empty"),
        (ZeroShotRequest("  ", ("a",)), {}, InvalidInput, "sequence to classify is empty"),
        (ZeroShotRequest(TEXTS[0], tuple(f"label {i}" for i in range(10_000))), {}, InputTooLarge,
         f"at most {MAX_CANDIDATE_LABELS}"),
        (ZeroShotRequest(TEXTS[0], ("a", "b")), {"hypothesis_template": "no placeholder"}, InvalidParameter,
         'has no "{}"'),
        (ZeroShotRequest(TEXTS[0], ("a", "b")), {"hypothesis_template": "{0} and {1}"}, InvalidParameter,
         "not a valid format string"),
        (ZeroShotRequest(TEXTS[0], ("word " * 200,)), {}, InputTooLarge, "hypothesis for candidate label"),
    ]
    for request, options, error, message in cases:
        with pytest.raises(error, match=message):
            ours.classify([request], options)
    assert ours.classify([ZeroShotRequest(TEXTS[0], ("a", "b"))])[0].labels  # still serving


def test_duplicate_error_names_the_request_in_a_batch(nli):
    _, _, _, ours = nli
    with pytest.raises(InvalidInput, match="request 1: "):
        ours.classify([ZeroShotRequest(TEXTS[0], ("a",)), ZeroShotRequest(TEXTS[1], ("b", "b"))])


def test_entailment_id_found_from_label2id(tmp_path):
    # Entailment first (id 0): contradiction is then the last id, as transformers picks it.
    from transformers import pipeline

    directory = build_bart_nli(tmp_path / "bart", label2id={"ENTAILMENT": 0, "neutral": 1, "contradiction": 2})
    ours = load_pipeline(directory)
    assert (ours.entailment_id, ours.contradiction_id) == (0, -1)
    oracle = pipeline("zero-shot-classification", model=str(directory))
    for multi in (False, True):
        [result] = ours.classify([ZeroShotRequest(TEXTS[1], tuple(LABELS))], {"multi_label": multi})
        _check(result, oracle(TEXTS[1], candidate_labels=LABELS, multi_label=multi))
