"""question-answering parity with transformers' pipeline("question-answering") (4.57.6, the
last release that has it; see qa_oracle.py) on tiny random bert, roberta, xlm-roberta and
distilbert checkpoints: answers, scores (1e-4), character offsets, top_k, doc_stride windows,
max_answer_len, handle_impossible_answer, align_to_words, all items batched with padding."""
from __future__ import annotations

import pytest

import qa_oracle
from encoder_checkpoints import FAMILIES, build_checkpoint
from harness import load_pipeline

CONTEXT = ("My name is Wolfgang and I live in Berlin. Sarah works at Acme Corporation in New York City! "
           "Paris is the capital of France.")
LONG = " ".join([CONTEXT] * 3)
CASES = [
    dict(question="Where does Wolfgang live?", context=CONTEXT, kwargs=dict(top_k=3)),
    dict(question="Who?", context=CONTEXT, kwargs=dict(top_k=2, max_seq_len=24, doc_stride=6)),
    dict(question="What is it?", context="Paris.", kwargs=dict(align_to_words=False)),
    dict(question="What is the capital?", context=LONG, kwargs=dict(top_k=5, doc_stride=10)),
    dict(question="Who works?", context=CONTEXT, kwargs=dict(top_k=4, max_answer_len=2)),
    dict(question="Who works?", context="x", kwargs=dict(top_k=2, handle_impossible_answer=True)),
    dict(question="Where is Paris?", context=LONG, kwargs=dict(top_k=3, handle_impossible_answer=True,
                                                                max_seq_len=32, doc_stride=4)),
    dict(question="Ünïcode?", context="Ünïcode wörds, émojis and numbers like 1234 or 3.14 appear too.",
         kwargs=dict(top_k=3, align_to_words=False)),
]



@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    directory, _, _ = build_checkpoint(request.param, "question_answering", tmp_path_factory.mktemp(request.param),
                                       model_max_length=64)
    return load_pipeline(directory), qa_oracle.run(directory, CASES)


def _same(ours, reference):
    assert [(a.answer, a.start, a.end) for a in ours] == [(r["answer"], r["start"], r["end"]) for r in reference]
    for a, r in zip(ours, reference, strict=True):
        assert abs(a.score - r["score"]) <= 1e-4


@pytest.mark.parametrize("case", range(len(CASES)))
def test_answers_match_transformers(checkpoint, case):
    from pipeserve.pipelines.question_answering import QAInput

    ours, reference = checkpoint
    c = CASES[case]
    _same(ours.answer([QAInput(c["question"], c["context"])], c["kwargs"])[0], reference[case])


def test_batched_items_match_one_at_a_time(checkpoint):
    """Several (question, context) items with different window counts, run as one padded batch."""
    from pipeserve.pipelines.question_answering import QAInput

    ours, reference = checkpoint
    indices = [0, 3, 5, 7]
    options = dict(top_k=3, doc_stride=10, handle_impossible_answer=True)
    batched = ours.answer([QAInput(CASES[i]["question"], CASES[i]["context"]) for i in indices], options)
    for i, got in zip(indices, batched, strict=True):
        alone = ours.answer([QAInput(CASES[i]["question"], CASES[i]["context"])], options)[0]
        assert [(a.answer, a.start, a.end) for a in got] == [(a.answer, a.start, a.end) for a in alone]
        assert all(abs(a.score - b.score) <= 1e-6 for a, b in zip(got, alone, strict=True))


def test_offsets_slice_the_answer_from_the_context(checkpoint):
    from pipeserve.pipelines.question_answering import QAInput

    ours, _ = checkpoint
    for answer in ours.answer([QAInput("Where?", LONG)], {"top_k": 5})[0]:
        assert LONG[answer.start:answer.end] == answer.answer


def test_bad_input(checkpoint):
    from pipeserve.errors import InvalidInput, InvalidParameter
    from pipeserve.pipelines.question_answering import QAInput

    ours, _ = checkpoint
    with pytest.raises(InvalidInput, match="question is empty"):
        ours.answer([QAInput("", CONTEXT)])
    with pytest.raises(InvalidInput, match="context is empty"):
        ours.answer([QAInput("Who?", "   ")])
    for name in ("top_k", "max_answer_len", "max_seq_len", "max_question_len"):
        with pytest.raises(InvalidParameter, match=f"{name} must be at least 1"):
            ours.answer([QAInput("Who?", CONTEXT)], {name: 0})
    with pytest.raises(InvalidParameter, match="larger than max_seq_len"):
        ours.answer([QAInput("Who?", CONTEXT)], {"max_seq_len": 20, "doc_stride": 21})
    with pytest.raises(InvalidParameter, match="doc_stride .* must be less than"):
        ours.answer([QAInput("Who works at Acme in New York?", LONG)], {"max_seq_len": 24, "doc_stride": 16})
    with pytest.raises(InvalidParameter, match="at most the model's maximum 64"):
        ours.answer([QAInput("Who?", CONTEXT)], {"max_seq_len": 500})
    with pytest.raises(InvalidInput, match="no room for the context") as info:
        ours.answer([QAInput("Who works at Acme Corporation in New York City? " * 4, CONTEXT)],
                    {"max_seq_len": 24, "doc_stride": 2})
    assert info.value.reason == "INPUT_TOO_LARGE"


def test_max_question_len_cuts_long_questions(checkpoint):
    from pipeserve.pipelines.question_answering import QAInput

    ours, _ = checkpoint
    question = "Who works at Acme Corporation in New York City? " * 4
    answers = ours.answer([QAInput(question, CONTEXT)], {"max_seq_len": 64, "doc_stride": 4, "max_question_len": 8})
    assert answers[0] and all(CONTEXT[a.start:a.end] == a.answer for a in answers[0])
