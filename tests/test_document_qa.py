"""Document question answering parity with transformers.pipeline on a tiny random LayoutLM and
a rendered invoice read by real Tesseract (transformers runs it through pytesseract, we call
the binary), plus bad inputs."""
from __future__ import annotations

import pytest
import torch

from harness import assert_close, load_pipeline
from zero_shot_docqa_checkpoints import build_layoutlm_qa, png_bytes, render_invoice

from pipeserve.inputs import ocr
from pipeserve.errors import InputTooLarge, InvalidInput, InvalidParameter, UnsupportedFormat
from pipeserve.inputs.ocr import OcrUnavailable, Word
from pipeserve.pipelines.document_question_answering import DocumentQuery

pytest.importorskip("pytesseract", reason="the oracle runs OCR through pytesseract (pip install pytesseract)")
if ocr.tesseract_binary() is None:  # the setup installs it; without it these tests cannot prove anything
    pytest.fail("tesseract is not installed (apt-get install -y tesseract-ocr tesseract-ocr-eng)")

QUESTIONS = ["What is the invoice number?", "What is the total?"]


@pytest.fixture(scope="module")
def page():
    image = render_invoice()
    return image, png_bytes(image)


@pytest.fixture(scope="module")
def docqa(tmp_path_factory):
    from transformers import pipeline

    directory = build_layoutlm_qa(tmp_path_factory.mktemp("layoutlm"))
    return pipeline("document-question-answering", model=str(directory)), load_pipeline(directory)


def _as_tuples(answers):
    return [(a.answer, a.start_word, a.end_word) for a in answers]


def _check(ours, reference):
    assert _as_tuples(ours) == [(r["answer"], r["start"], r["end"]) for r in reference]
    for a, r in zip(ours, reference, strict=True):
        assert abs(a.score - r["score"]) <= 1e-4


def test_ocr_words_and_boxes_equal_transformers(page):
    from transformers.pipelines.document_question_answering import apply_tesseract

    image, data = page
    words, boxes = apply_tesseract(image, lang=None, tesseract_config="")
    ours = ocr.run_tesseract(image)
    assert [w.text for w in ours] == words
    assert [list(w.box) for w in ours] == boxes
    # The rendered text is really read (not just equally misread).
    assert {"Invoice", "12345", "Total:", "$99.00"} <= set(words)


def test_tsv_parsing_matches_pytesseract():
    from pytesseract.pytesseract import file_to_dict

    tsv = ("level\tpage_num\tblock_num\tpar_num\tline_num\tword_num\tleft\ttop\twidth\theight\tconf\ttext\n"
           "1\t1\t0\t0\t0\t0\t0\t0\t640\t480\t-1\t\n"
           "5\t1\t1\t1\t1\t1\t10\t20\t30\t40\t96.5\tHello\n"
           "5\t1\t1\t1\t1\t2\t50\t20\t30\t40\t95\t \n"
           "5\t1\t1\t1\t1\t3\t90\t20\t33\t41\t91\tworld\t\n")
    data = file_to_dict(tsv, "\t", -1)
    assert ocr._tsv_to_columns(tsv) == data
    words = ocr.words_from_tsv(tsv, 640, 480)
    assert [(w.text, w.box) for w in words] == [("Hello", (15, 41, 62, 125)), ("world", (140, 41, 192, 127))]


def test_logits_match_transformers(docqa, page):
    oracle, ours = docqa
    words = ocr.run_tesseract(page[0])
    windows = ours.windows(0, QUESTIONS[0], words, ours.default_options)
    assert len(windows) == 1
    w = windows[0]
    with torch.no_grad():
        ref = oracle.model(input_ids=torch.tensor([w.ids]), bbox=torch.tensor([w.bbox]),
                           token_type_ids=torch.tensor([w.type_ids]),
                           attention_mask=torch.ones(1, len(w.ids), dtype=torch.long))
    [(start, end)] = ours.forward(windows)
    assert_close(torch.from_numpy(start)[None], ref.start_logits)
    assert_close(torch.from_numpy(end)[None], ref.end_logits)


OPTION_SETS = [
    {},
    {"top_k": 5},
    {"top_k": 3, "max_answer_len": 2},
    {"top_k": 30, "handle_impossible_answer": True},
    {"max_seq_len": 20, "doc_stride": 4, "top_k": 6},  # several overlapping windows
    {"max_seq_len": 16, "doc_stride": 2, "top_k": 3, "max_answer_len": 1},
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_answers_equal_transformers_on_ocr(docqa, page, options):
    oracle, ours = docqa
    image, data = page
    for question in QUESTIONS:
        reference = oracle(image=image, question=question, **options)
        [result] = ours.answer([DocumentQuery(question, image=data)], options)
        _check(result.answers, reference)
        assert result.words == ocr.run_tesseract(image) and result.words


def test_impossible_answer_is_returned_when_allowed(docqa, page):
    oracle, ours = docqa
    options = {"top_k": 100, "max_answer_len": 1, "handle_impossible_answer": True}  # every span fits top_k
    [result] = ours.answer([DocumentQuery("What is the colour of the sky?", image=page[1])], options)
    empty = [a for a in result.answers if a.answer == ""]
    assert len(empty) == 1 and (empty[0].start_word, empty[0].end_word) == (0, 0) and empty[0].score > 0
    _check(result.answers, oracle(image=page[0], question="What is the colour of the sky?", **options))


def test_client_words_and_batched_queries(docqa, page):
    oracle, ours = docqa
    words = [Word("Invoice", (50, 100, 200, 150)), Word("number:", (210, 100, 400, 150)),
             Word("A-77", (420, 100, 520, 150)), Word("Total", (50, 300, 160, 350)), Word("$5", (170, 300, 230, 350))]
    word_boxes = [(w.text, list(w.box)) for w in words]
    queries = [DocumentQuery(q, words=tuple(words)) for q in QUESTIONS] + [DocumentQuery(QUESTIONS[0], image=page[1])]
    options = {"top_k": 4, "max_seq_len": 18, "doc_stride": 3}
    batched = ours.answer(queries, options)
    for query, result in zip(queries, batched, strict=True):
        if query.words:
            reference = oracle(image=None, question=query.question, word_boxes=word_boxes, **options)
            assert result.words == words
        else:
            reference = oracle(image=page[0], question=query.question, **options)
        _check(result.answers, reference)
        _check(ours.answer([query], options)[0].answers, reference)


def test_bad_inputs(docqa, page, monkeypatch):
    _, ours = docqa
    blank = png_bytes(render_invoice(lines=[]))
    good = [Word("Total", (50, 300, 160, 350))]
    cases = [
        (DocumentQuery(QUESTIONS[0], image=blank), {}, InvalidInput, "OCR found no text"),
        (DocumentQuery("   ", image=page[1]), {}, InvalidInput, "question is empty"),
        (DocumentQuery(QUESTIONS[0]), {}, InvalidInput, "neither"),
        (DocumentQuery(QUESTIONS[0], image=b"not an image"), {}, UnsupportedFormat, "not an image"),
        (DocumentQuery(QUESTIONS[0], words=(Word("x", (0, 0, 1001, 5)),)), {}, InvalidInput, "0 <= x0"),
        (DocumentQuery(QUESTIONS[0], words=(Word("x", (50, 0, 10, 5)),)), {}, InvalidInput, "x1"),
        (DocumentQuery(QUESTIONS[0], words=(Word(" ", (0, 0, 1, 1)),)), {}, InvalidInput, "empty text"),
        (DocumentQuery(QUESTIONS[0], image=page[1]), {"ocr_lang": "eng; rm -rf /"}, InvalidParameter, "language"),
        (DocumentQuery(QUESTIONS[0], image=page[1]), {"ocr_lang": "xyz"}, OcrUnavailable, "no data for language"),
        (DocumentQuery(QUESTIONS[0], words=tuple(good)), {"top_k": 0}, InvalidParameter, "top_k"),
        (DocumentQuery(QUESTIONS[0], words=tuple(good)), {"max_answer_len": 0}, InvalidParameter, "max_answer_len"),
        (DocumentQuery(QUESTIONS[0], words=tuple(good)), {"max_seq_len": 4096}, InvalidParameter, "maximum"),
        (DocumentQuery(QUESTIONS[0], words=tuple(good)), {"max_seq_len": 16, "doc_stride": 12}, InvalidParameter,
         "doc_stride"),
        (DocumentQuery("word " * 80, words=tuple(good)), {}, InputTooLarge, "max_question_len"),
        (DocumentQuery("word " * 21, words=tuple(good)), {"max_question_len": 100}, InputTooLarge, "no room"),
        (DocumentQuery(QUESTIONS[0], words=tuple(good) * 10_001), {}, InputTooLarge, "at most 10000"),
    ]
    for query, options, error, message in cases:
        with pytest.raises(error, match=message):
            ours.answer([query], options)
    # Tesseract missing: a clear precondition error naming the fix, client words still work.
    monkeypatch.setenv("PIPESERVE_TESSERACT", "/nonexistent/tesseract")
    with pytest.raises(OcrUnavailable, match="send the page's words"):
        ours.answer([DocumentQuery(QUESTIONS[0], image=page[1])])
    monkeypatch.delenv("PIPESERVE_TESSERACT")
    monkeypatch.setattr(ocr.shutil, "which", lambda name: None)
    with pytest.raises(OcrUnavailable, match="not installed"):
        ours.answer([DocumentQuery(QUESTIONS[0], image=page[1])])
    assert ours.answer([DocumentQuery(QUESTIONS[0], words=tuple(good))])[0].answers


def test_document_longer_than_the_model_is_split_into_windows(docqa):
    # 120 words (> 64 model positions) with the default max_seq_len and doc_stride.
    oracle, ours = docqa
    vocabulary = ["Invoice", "number:", "12345", "Total:", "$99.00", "Date:", "ACME", "Corporation"]
    words = tuple(Word(vocabulary[i % len(vocabulary)], (i * 8 % 900, i * 7 % 950, i * 8 % 900 + 60, i * 7 % 950 + 30))
                  for i in range(120))
    windows = ours.windows(0, QUESTIONS[1], list(words), ours.default_options)
    assert len(windows) > 2 and all(len(w.ids) <= ours.max_tokens for w in windows)
    word_boxes = [(w.text, list(w.box)) for w in words]
    for options in ({}, {"top_k": 5}, {"top_k": 3, "doc_stride": 10, "handle_impossible_answer": True}):
        [result] = ours.answer([DocumentQuery(QUESTIONS[1], words=words)], options)
        _check(result.answers, oracle(image=None, question=QUESTIONS[1], word_boxes=word_boxes, **options))
