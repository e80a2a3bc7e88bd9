"""Zero-shot classification and document question answering end to end through gRPC: tiny
random checkpoints loaded with LoadModel answer exactly as transformers.pipeline does (also
under concurrent callers, who are batched), bad input gets a specific status and reason, and
the server keeps serving."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from grpc_testing import error_reason, load_model
from zero_shot_docqa_checkpoints import build_bart_nli, build_encoder_nli, build_layoutlm_qa, png_bytes, render_invoice

transformers = pytest.importorskip("transformers")

LABELS = ["sports", "politics", "cooking", "weather"]
TEXTS = ["I love playing football on weekends", "The election results were announced today.", "Quick!"]


@pytest.fixture(scope="module")
def nli_models(grpc_server, tmp_path_factory):
    bart = build_bart_nli(tmp_path_factory.mktemp("grpc_bart_nli"))
    bert = build_encoder_nli("bert", tmp_path_factory.mktemp("grpc_bert_nli"))
    for path in (bart, bert):
        info = load_model(grpc_server, path)
        assert info.task == 4  # TASK_ZERO_SHOT_CLASSIFICATION, inferred from the NLI label2id
    return {"bart": bart, "bert": bert}


@pytest.fixture(scope="module")
def layoutlm(grpc_server, tmp_path_factory):
    path = build_layoutlm_qa(tmp_path_factory.mktemp("grpc_layoutlm"))
    assert load_model(grpc_server, path).task == 5  # TASK_DOCUMENT_QUESTION_ANSWERING
    return path


@pytest.fixture(scope="module")
def page():
    image = render_invoice()
    return image, png_bytes(image)


def _zs_stub(server):
    from pipeserve.v1 import zero_shot_classification_pb2_grpc

    return zero_shot_classification_pb2_grpc.ZeroShotClassificationServiceStub(server.channel)


def _dqa_stub(server):
    from pipeserve.v1 import document_question_answering_pb2_grpc

    return document_question_answering_pb2_grpc.DocumentQuestionAnsweringServiceStub(server.channel)


def _error_info(error: grpc.RpcError):
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    for detail in rpc_status.from_call(error).details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    return None


def _fails(call, request, code, reason, message):
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=60)
    assert caught.value.code() == code, caught.value.details()
    assert error_reason(caught.value) == reason, caught.value.details()
    assert message in caught.value.details()
    return caught.value


@pytest.mark.parametrize("family", ["bart", "bert"])
def test_zero_shot_equals_transformers(grpc_server, nli_models, family):
    from pipeserve.v1 import zero_shot_classification_pb2 as pb

    path = nli_models[family]
    oracle = transformers.pipeline("zero-shot-classification", model=str(path))
    stub = _zs_stub(grpc_server)
    for multi_label in (None, False, True):
        for text in TEXTS:
            request = pb.ClassifyZeroShotRequest(model=str(path), request_id="zs", sequence=text,
                                                 candidate_labels=LABELS)
            if multi_label is not None:
                request.multi_label = multi_label
            response = stub.ClassifyZeroShot(request, timeout=60)
            reference = oracle(text, candidate_labels=LABELS, multi_label=bool(multi_label))
            assert response.request_id == "zs" and response.sequence == text
            assert [l.label for l in response.labels] == reference["labels"]
            for label, score in zip(response.labels, reference["scores"]):
                assert abs(label.score - score) <= 1e-4
            assert response.run.model == str(path)


def test_zero_shot_concurrent_callers_are_batched_and_exact(grpc_server, nli_models):
    from pipeserve.v1 import zero_shot_classification_pb2 as pb

    path = nli_models["bart"]
    oracle = transformers.pipeline("zero-shot-classification", model=str(path))
    stub = _zs_stub(grpc_server)
    requests = [pb.ClassifyZeroShotRequest(model=str(path), sequence=f"{TEXTS[i % 3]} {i}",
                                           candidate_labels=LABELS[: 2 + i % 3],
                                           hypothesis_template="The topic is {}.") for i in range(12)]
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda r: stub.ClassifyZeroShot(r, timeout=60), requests))
    for request, response in zip(requests, responses):
        reference = oracle(request.sequence, candidate_labels=list(request.candidate_labels),
                           hypothesis_template="The topic is {}.")
        assert [l.label for l in response.labels] == reference["labels"]
        for label, score in zip(response.labels, reference["scores"]):
            assert abs(label.score - score) <= 1e-4
    assert max(r.run.batch_size for r in responses) > 1  # concurrent callers shared a forward pass


def test_zero_shot_bad_inputs(grpc_server, nli_models):
    from pipeserve.v1 import zero_shot_classification_pb2 as pb

    path = str(nli_models["bart"])
    stub = _zs_stub(grpc_server)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    call = stub.ClassifyZeroShot
    req = lambda **kw: pb.ClassifyZeroShotRequest(model=path, **{"sequence": TEXTS[0], **kw})
    _fails(call, req(), invalid, "NO_CANDIDATE_LABELS", "candidate_labels is empty")
    _fails(call, req(candidate_labels=["a", "b", "a"]), invalid, "DUPLICATE_LABELS", "more than once")
    error = _fails(call, req(candidate_labels=[f"l{i}" for i in range(10_000)]), invalid, "INPUT_TOO_LARGE",
                   "at most 128")
    assert _error_info(error).metadata["limit"] == "128"
    _fails(call, req(candidate_labels=["a", "b"], hypothesis_template="no placeholder"), invalid,
           "INVALID_PARAMETER", 'has no "{}"')
    _fails(call, req(sequence="", candidate_labels=["a"]), invalid, "EMPTY_INPUT", "empty")
    long_text = " ".join(["The election results were announced today in the capital."] * 10)
    _fails(call, req(sequence=long_text, candidate_labels=["a"], truncation=False), invalid, "INPUT_TOO_LARGE",
           "at most 48")
    # Default: the premise is truncated as transformers does, and the answer matches it.
    oracle = transformers.pipeline("zero-shot-classification", model=path)
    response = call(req(sequence=long_text, candidate_labels=["sports", "politics"]), timeout=60)
    assert [l.label for l in response.labels] == oracle(long_text, candidate_labels=["sports", "politics"])["labels"]
    # One label: scored on its own (entailment vs contradiction), as transformers does.
    one = call(req(candidate_labels=["sports"]), timeout=60)
    assert abs(one.labels[0].score - oracle(TEXTS[0], candidate_labels=["sports"])["scores"][0]) <= 1e-4


def test_docqa_equals_transformers_with_ocr_and_client_words(grpc_server, layoutlm, page):
    from pipeserve.v1 import common_pb2, document_question_answering_pb2 as pb

    oracle = transformers.pipeline("document-question-answering", model=str(layoutlm))
    stub = _dqa_stub(grpc_server)
    image, data = page
    for question, options in [("What is the invoice number?", {}),
                              ("What is the total?", {"top_k": 4, "max_seq_len": 20, "doc_stride": 4}),
                              ("What is the total?", {"top_k": 30, "max_answer_len": 1,
                                                      "handle_impossible_answer": True})]:
        response = stub.AnswerDocumentQuestion(pb.AnswerDocumentQuestionRequest(
            model=str(layoutlm), request_id="d", image=common_pb2.ImageInput(data=data), question=question,
            **options), timeout=60)
        reference = oracle(image=image, question=question, **options)
        assert [(a.answer, a.start_word, a.end_word) for a in response.answers] == \
            [(r["answer"], r["start"], r["end"]) for r in reference]
        for a, r in zip(response.answers, reference):
            assert abs(a.score - r["score"]) <= 1e-4
        from transformers.pipelines.document_question_answering import apply_tesseract
        words, boxes = apply_tesseract(image, lang=None, tesseract_config="")
        assert [w.text for w in response.words] == words
        assert [[w.box.x0, w.box.y0, w.box.x1, w.box.y1] for w in response.words] == boxes
    # Client-supplied words: no image needed.
    word_boxes = [("Invoice", [50, 100, 200, 150]), ("number:", [210, 100, 400, 150]), ("A-77", [420, 100, 520, 150])]
    response = stub.AnswerDocumentQuestion(pb.AnswerDocumentQuestionRequest(
        model=str(layoutlm), question="What is the invoice number?", top_k=3,
        words=[pb.DocumentWord(text=t, box=pb.BoundingBox(x0=b[0], y0=b[1], x1=b[2], y1=b[3])) for t, b in word_boxes]),
        timeout=60)
    reference = oracle(image=None, question="What is the invoice number?", word_boxes=word_boxes, top_k=3)
    assert [(a.answer, a.start_word, a.end_word) for a in response.answers] == \
        [(r["answer"], r["start"], r["end"]) for r in reference]


def test_docqa_bad_inputs_and_tesseract_missing(grpc_server, layoutlm, nli_models, page, monkeypatch):
    from pipeserve.v1 import common_pb2, document_question_answering_pb2 as pb
    from pipeserve.v1 import zero_shot_classification_pb2 as zpb

    stub = _dqa_stub(grpc_server)
    call = stub.AnswerDocumentQuestion
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    req = lambda data=page[1], **kw: pb.AnswerDocumentQuestionRequest(
        model=str(layoutlm), image=common_pb2.ImageInput(data=data), **{"question": "What is the total?", **kw})
    _fails(call, req(data=png_bytes(render_invoice(lines=[]))), invalid, "NO_TEXT_FOUND", "OCR found no text")
    _fails(call, req(question="  "), invalid, "EMPTY_INPUT", "question is empty")
    _fails(call, pb.AnswerDocumentQuestionRequest(model=str(layoutlm), question="Total?"), invalid, "EMPTY_INPUT",
           "neither")
    _fails(call, req(data=b"\x89PNG\r\n\x1a\ntruncated"), invalid, "CORRUPT_IMAGE", "PNG")
    _fails(call, req(top_k=0), invalid, "INVALID_PARAMETER", "top_k")
    _fails(call, req(max_seq_len=16, doc_stride=12), invalid, "INVALID_PARAMETER", "doc_stride")
    _fails(call, req(ocr_lang="xyz"), grpc.StatusCode.FAILED_PRECONDITION, "OCR_LANGUAGE_UNAVAILABLE", "xyz")
    # A zero-shot model asked for document QA: the wrong task.
    _fails(call, pb.AnswerDocumentQuestionRequest(model=str(nli_models["bart"]), question="x"),
           grpc.StatusCode.FAILED_PRECONDITION, "WRONG_TASK", "")
    _fails(_zs_stub(grpc_server).ClassifyZeroShot,
           zpb.ClassifyZeroShotRequest(model=str(layoutlm), sequence="x", candidate_labels=["a"]),
           grpc.StatusCode.FAILED_PRECONDITION, "WRONG_TASK", "")
    # Tesseract missing (the server runs in this process, so the override reaches it).
    monkeypatch.setenv("PIPESERVE_TESSERACT", "/nonexistent/tesseract")
    _fails(call, req(), grpc.StatusCode.FAILED_PRECONDITION, "OCR_UNAVAILABLE", "send the page's words")
    monkeypatch.delenv("PIPESERVE_TESSERACT")
    # Still serving.
    assert call(req(), timeout=60).answers
