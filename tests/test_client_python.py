"""The Python client against a real server (the session's `grpc_server`): every ModelService
method, image classification from every input kind, typed errors carrying ErrorInfo, map()
ordering and its concurrency bound, the asyncio client, and one test per task that checks the
client sends exactly the request a hand-built stub call sends (same response).

Tasks whose servicer module has not landed yet are skipped, naming the module; they run as
soon as pipeserve.api.<module> exists."""
from __future__ import annotations

import asyncio
import importlib
import importlib.util
import io
import shutil
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from client_models import loader_fixture, require_servicer
from pipeserve_client import (AsyncClient, Client, FailedPreconditionError, InputError, InputFileError,
                              InvalidArgumentError, NotFoundError, UnimplementedError, to_dict)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def client(grpc_server):
    with Client(grpc_server.address, timeout=120) as c:
        yield c


loaded = loader_fixture()  # loaded(kind) -> model name


@pytest.fixture(scope="module")
def vit(loaded):
    """A tiny random ViT with six labels, loaded through the client."""
    return loaded("vit")


def _image(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _without_run(message):
    copy = type(message)()
    copy.CopyFrom(message)
    copy.ClearField("run")
    return copy


# --- ModelService -------------------------------------------------------------------------

def test_models_load_list_get_unload(client, vit):
    from pipeserve.v1 import model_pb2

    listed = {m.name: m for m in client.models.list()}
    assert vit in listed and listed[vit].state == model_pb2.MODEL_STATE_READY
    assert vit in [m.name for m in client.models.list("image-classification")]
    assert client.models.list("fill-mask") == [] or all(
        m.task == model_pb2.TASK_FILL_MASK for m in client.models.list("fill-mask"))
    info = client.models.get(vit)
    assert info.task == model_pb2.TASK_IMAGE_CLASSIFICATION and info.family == "vit" and info.bytes > 0


def test_models_errors_are_typed_with_reason(client, tmp_path):
    with pytest.raises(NotFoundError) as info:
        client.models.load(str(tmp_path / "missing"))
    assert info.value.reason == "MODEL_NOT_FOUND"
    assert "does not exist" in info.value.details
    assert not info.value.retryable
    with pytest.raises(NotFoundError):
        client.models.get("never-loaded")
    with pytest.raises(InvalidArgumentError):
        client.models.load("")
    with pytest.raises(InputError, match="dtype must be one of"):
        client.models.load(str(tmp_path), dtype="float8")


def test_load_with_options_and_unload(client, grpc_server, tmp_path_factory, vit):
    """A second copy loaded with explicit options and default call options, then unloaded."""
    from pipeserve.v1 import model_pb2

    # Another directory: one directory is one model, however it is spelled.
    source = shutil.copytree(client.models.get(vit).source_path, tmp_path_factory.mktemp("client_vit_copy") / "vit")
    info = client.models.load(str(source) + "/", task="image-classification", device="cpu", dtype="float32",
                              default_options={"top_k": 2})
    try:
        assert info.state == model_pb2.MODEL_STATE_READY and info.dtype == model_pb2.D_TYPE_FLOAT32
        assert len(client.classify_image(_image(1), model=info.name).labels) == 2  # the default option
        assert len(client.classify_image(_image(1), model=info.name, top_k=4).labels) == 4  # per call
    finally:
        unloaded = client.models.unload(info.name)
    assert unloaded.name == info.name
    with pytest.raises(NotFoundError):
        client.models.get(info.name)


# --- image classification -----------------------------------------------------------------

def test_classify_image_from_every_input_kind(client, vit, tmp_path):
    from pipeserve.v1 import common_pb2, image_classification_pb2 as pb, image_classification_pb2_grpc as pb_grpc

    image = _image(3)
    path = tmp_path / "photo.png"
    image.save(path)
    raw = pb_grpc.ImageClassificationServiceStub(client._channel).ClassifyImage(
        pb.ClassifyImageRequest(model=vit, request_id="fixed", image=common_pb2.ImageInput(data=_png(image)), top_k=3),
        timeout=60)
    expected = _without_run(raw)
    for source in (str(path), path, _png(image), bytearray(_png(image)), image, np.asarray(image)):
        got = client.classify_image(source, model=vit, top_k=3, request_id="fixed")
        assert _without_run(got) == expected, type(source)
    assert len(expected.labels) == 3
    assert [label.score for label in expected.labels] == sorted((l.score for l in expected.labels), reverse=True)
    as_dict = to_dict(raw)
    assert as_dict["request_id"] == "fixed" and set(as_dict["labels"][0]) == {"label", "score"}


def test_classify_image_function_to_apply(client, vit):
    softmax = client.classify_image(_image(4), model=vit, top_k=6, function_to_apply="softmax")
    assert abs(sum(l.score for l in softmax.labels) - 1.0) < 1e-4
    raw = client.classify_image(_image(4), model=vit, top_k=6, function_to_apply="none")
    assert any(l.score < 0 or l.score > 1 for l in raw.labels) or \
        abs(sum(l.score for l in raw.labels) - 1.0) > 1e-3
    with pytest.raises(InputError, match="function_to_apply must be one of"):
        client.classify_image(_image(4), model=vit, function_to_apply="relu")


def test_image_errors_are_typed_and_the_next_call_works(client, vit, tmp_path):
    with pytest.raises(InputFileError, match="image file not found"):
        client.classify_image(tmp_path / "nope.jpg", model=vit)
    with pytest.raises(InvalidArgumentError) as info:
        client.classify_image(b"this is a text file, not an image", model=vit)
    assert info.value.reason in ("UNSUPPORTED_FORMAT", "INVALID_INPUT")
    with pytest.raises(InvalidArgumentError) as info:
        client.classify_image(_image(0), model=vit, top_k=0)
    assert info.value.reason == "INVALID_PARAMETER" and info.value.metadata.get("field") == "top_k"
    with pytest.raises(NotFoundError) as info:
        client.classify_image(_image(0), model="not-loaded")
    assert info.value.reason == "MODEL_NOT_FOUND"
    with pytest.raises(InputError, match="cannot use int as an image"):
        client.classify_image(42, model=vit)
    assert client.classify_image(_image(0), model=vit, top_k=1).labels


def test_wrong_task_is_failed_precondition(client, vit):
    """The ViT is an image model; the fill-mask service refuses it by name (WRONG_TASK), or
    answers UNIMPLEMENTED while that task has no servicer."""
    with pytest.raises((FailedPreconditionError, UnimplementedError)) as info:
        client.fill_mask("a [MASK] b", model=vit)
    assert info.value.reason in ("WRONG_TASK", "TASK_NOT_IMPLEMENTED")


# --- map ----------------------------------------------------------------------------------

def test_map_keeps_input_order_and_bounds_in_flight(client, vit):
    images = [_image(seed) for seed in range(12)]
    expected = [[(l.label, l.score) for l in client.classify_image(im, model=vit, top_k=2).labels]
                for im in images]
    lock = threading.Lock()
    in_flight = peak = 0

    def classify(index: int):
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        try:
            # Later items finish first, so an unordered map would come back reversed.
            time.sleep(0.02 * (12 - index) / 12)
            return client.classify_image(images[index], model=vit, top_k=2)
        finally:
            with lock:
                in_flight -= 1

    consumed = []

    def lazy_inputs():
        for i in range(12):
            consumed.append(i)
            yield i

    results = client.map(classify, lazy_inputs(), concurrency=3)
    first = next(results)
    assert len(consumed) <= 4, "map must consume its inputs lazily"
    got = [first, *results]
    # Concurrent calls may be batched by the server: same labels, scores equal to float32 rounding.
    assert [[l.label for l in r.labels] for r in got] == [[label for label, _ in row] for row in expected]
    assert all(abs(l.score - score) < 1e-5 for r, row in zip(got, expected) for l, (_, score) in zip(r.labels, row))
    assert 1 < peak <= 3


def test_map_errors_in_order_or_returned(client, vit):
    items = [_image(0), b"not an image", _image(1)]
    results = list(client.map(lambda x: client.classify_image(x, model=vit, top_k=1), items, concurrency=2,
                              return_exceptions=True))
    assert results[0].labels and results[2].labels
    assert isinstance(results[1], InvalidArgumentError)
    with pytest.raises(InvalidArgumentError):
        list(client.map(lambda x: client.classify_image(x, model=vit, top_k=1), items, concurrency=2))


# --- asyncio client -----------------------------------------------------------------------

def test_async_client_models_classify_and_map(grpc_server, vit):
    async def scenario():
        async with AsyncClient(grpc_server.address, timeout=60) as client:
            await client.wait_ready(10)
            assert vit in [m.name for m in await client.models.list()]
            assert (await client.models.get(vit)).family == "vit"
            one = await client.classify_image(_image(5), model=vit, top_k=2)
            with pytest.raises(InvalidArgumentError) as info:
                await client.classify_image(_image(5), model=vit, top_k=-1)
            assert info.value.reason == "INVALID_PARAMETER"
            with pytest.raises(NotFoundError):
                await client.models.get("never-loaded")

            async def classify(seed):
                await asyncio.sleep(0.01 * (6 - seed))
                return await client.classify_image(_image(seed), model=vit, top_k=2)

            results = [r async for r in client.map(classify, range(6), concurrency=3)]
            return one, results

    one, results = asyncio.run(scenario())
    with Client(grpc_server.address, timeout=60) as sync:
        assert _without_run(one).labels == sync.classify_image(_image(5), model=vit, top_k=2).labels
        for seed, result in enumerate(results):
            alone = sync.classify_image(_image(seed), model=vit, top_k=2).labels
            assert [l.label for l in result.labels] == [l.label for l in alone]
            assert all(abs(a.score - b.score) < 1e-5 for a, b in zip(result.labels, alone))


# --- the other tasks: the client sends what a hand-built request sends ---------------------

def _stub(client, module: str, cls: str):
    return getattr(importlib.import_module(f"pipeserve.v1.{module}_pb2_grpc"), cls)(client._channel)


def _pb(module: str):
    return importlib.import_module(f"pipeserve.v1.{module}_pb2")


def test_classify_text(client, loaded):
    require_servicer("text_classification")
    model = loaded("sequence_classification")
    pb = _pb("text_classification")
    got = client.classify_text("Hugging Face is in Paris.", text_pair="It is a company.", model=model, top_k=2,
                               function_to_apply="sigmoid", request_id="t")
    raw = _stub(client, "text_classification", "TextClassificationServiceStub").ClassifyText(
        pb.ClassifyTextRequest(model=model, request_id="t", text="Hugging Face is in Paris.",
                               text_pair="It is a company.", top_k=2, function_to_apply=1), timeout=60)
    assert _without_run(got) == _without_run(raw) and len(got.labels) == 2


def test_classify_tokens(client, loaded):
    require_servicer("token_classification")
    model = loaded("token_classification")
    pb = _pb("token_classification")
    text = "My name is Wolfgang and I live in Berlin."
    got = client.classify_tokens(text, model=model, aggregation_strategy="simple", request_id="t")
    raw = _stub(client, "token_classification", "TokenClassificationServiceStub").ClassifyTokens(
        pb.ClassifyTokensRequest(model=model, request_id="t", text=text,
                                 aggregation_strategy=pb.AGGREGATION_STRATEGY_SIMPLE), timeout=60)
    assert _without_run(got) == _without_run(raw)
    for entity in got.entities:
        assert text[entity.start:entity.end].strip()


def test_answer_question(client, loaded):
    require_servicer("question_answering")
    model = loaded("question_answering")
    pb = _pb("question_answering")
    question, context = "What is the capital of France?", "Paris is the capital of France."
    got = client.answer_question(question, context, model=model, top_k=2, request_id="t")
    raw = _stub(client, "question_answering", "QuestionAnsweringServiceStub").AnswerQuestion(
        pb.AnswerQuestionRequest(model=model, request_id="t", question=question, context=context, top_k=2),
        timeout=60)
    assert _without_run(got) == _without_run(raw)
    assert got.answers and all(context[a.start:a.end] == a.answer for a in got.answers)


def test_fill_mask(client, loaded):
    require_servicer("fill_mask")
    model = loaded("masked_lm")
    pb = _pb("fill_mask")
    got = client.fill_mask("Paris is the [MASK] of France.", model=model, top_k=3, request_id="t")
    raw = _stub(client, "fill_mask", "FillMaskServiceStub").FillMask(
        pb.FillMaskRequest(model=model, request_id="t", text="Paris is the [MASK] of France.", top_k=3), timeout=60)
    assert _without_run(got) == _without_run(raw)
    assert len(got.masks) == 1 and len(got.masks[0].candidates) == 3


def test_extract_features(client, loaded):
    require_servicer("feature_extraction")
    model = loaded("base")
    pb = _pb("feature_extraction")
    got = client.extract_features("The quick brown fox.", model=model, pooling="mean", normalize=True,
                                  request_id="t")
    raw = _stub(client, "feature_extraction", "FeatureExtractionServiceStub").ExtractFeatures(
        pb.ExtractFeaturesRequest(model=model, request_id="t", text="The quick brown fox.",
                                  pooling=pb.POOLING_MEAN, normalize=True), timeout=60)
    assert _without_run(got) == _without_run(raw)
    vector = np.array(got.sentence_embedding.values)
    assert len(vector) == got.dimensions == 32 and abs(np.linalg.norm(vector) - 1.0) < 1e-4


def test_zero_shot(client, loaded):
    require_servicer("zero_shot_classification")
    model = loaded("nli")
    pb = _pb("zero_shot_classification")
    text = "The quick brown fox jumps over the lazy dog."
    got = client.zero_shot(text, "animals, politics, sports", model=model, multi_label=False, request_id="t")
    raw = _stub(client, "zero_shot_classification", "ZeroShotClassificationServiceStub").ClassifyZeroShot(
        pb.ClassifyZeroShotRequest(model=model, request_id="t", sequence=text,
                                   candidate_labels=["animals", "politics", "sports"], multi_label=False),
        timeout=60)
    assert _without_run(got) == _without_run(raw)
    assert sorted(l.label for l in got.labels) == ["animals", "politics", "sports"]
    assert abs(sum(l.score for l in got.labels) - 1.0) < 1e-4


def test_document_qa_with_word_boxes(client, loaded):
    require_servicer("document_question_answering")
    model = loaded("layoutlm")
    pb = _pb("document_question_answering")
    words = [("Invoice", (50, 50, 200, 90)), ("total", (50, 150, 150, 190)), ("42", (170, 150, 220, 190))]
    page = Image.new("RGB", (400, 300), "white")
    got = client.document_qa(page, "What is the total?", word_boxes=words, model=model, top_k=2, request_id="t")
    raw = _stub(client, "document_question_answering", "DocumentQuestionAnsweringServiceStub").AnswerDocumentQuestion(
        pb.AnswerDocumentQuestionRequest(
            model=model, request_id="t", image=_pb("common").ImageInput(data=_png(page)), question="What is the total?",
            words=[pb.DocumentWord(text=t, box=pb.BoundingBox(x0=b[0], y0=b[1], x1=b[2], y1=b[3])) for t, b in words],
            top_k=2), timeout=60)
    assert _without_run(got) == _without_run(raw)
    assert [w.text for w in got.words] == ["Invoice", "total", "42"]


def _speech(seconds: float = 2.0) -> np.ndarray:
    from wav2vec2_checkpoints import audio

    return audio(seconds).astype(np.float32)


def test_transcribe_unary_stream_and_input_kinds(client, loaded, tmp_path):
    require_servicer("speech_recognition")
    import soundfile

    model = loaded("ctc")
    samples = _speech()
    path = tmp_path / "speech.wav"
    soundfile.write(path, samples, 16000, subtype="FLOAT")
    whole = client.transcribe(samples, sampling_rate=16000, model=model, request_id="t")
    assert whole.request_id == "t" and whole.transcription.duration_s == pytest.approx(2.0, abs=0.01)
    for source in (str(path), path.read_bytes(), {"raw": samples, "sampling_rate": 16000},
                   (samples * 32767).astype(np.int16)):
        kwargs = {"sampling_rate": 16000} if isinstance(source, np.ndarray) else {}
        again = client.transcribe(source, model=model, request_id="t", **kwargs)
        assert again.transcription.text == whole.transcription.text
    messages = list(client.transcribe(samples, sampling_rate=16000, model=model, stream=True, request_id="s"))
    assert messages and messages[-1].HasField("done")
    assert all(m.request_id == "s" for m in messages)
    assert messages[-1].done.transcription.text == whole.transcription.text
    with pytest.raises(InputError, match="sampling_rate"):
        client.transcribe(samples, model=model)
    with pytest.raises(InputFileError, match="audio file not found"):
        client.transcribe(tmp_path / "missing.wav", model=model)
    with pytest.raises(InvalidArgumentError):
        client.transcribe(b"not audio at all", model=model)


def test_generate_unary_and_stream(client, loaded):
    require_servicer("text_generation")
    model = loaded("gpt2")
    pb = _pb("text_generation")
    whole = client.generate("The quick brown", model=model, max_new_tokens=5, do_sample=False, seed=7,
                            stop=["zz"], request_id="g")
    raw = _stub(client, "text_generation", "TextGenerationServiceStub").Generate(
        pb.GenerateRequest(model=model, request_id="g", prompt="The quick brown",
                           options=pb.GenerationOptions(max_new_tokens=5, do_sample=False, seed=7, stop=["zz"])),
        timeout=60)
    assert _without_run(whole) == _without_run(raw)
    messages = list(client.generate("The quick brown", model=model, max_new_tokens=5, do_sample=False, stream=True))
    tokens = [m.token for m in messages if m.HasField("token")]
    done = [m.done for m in messages if m.HasField("done")]
    assert len(done) == 1 and done[0].generated_tokens == len(tokens) <= 5
    assert done[0].text == whole.sequences[0].text

    async def stream_async():
        async with AsyncClient(client.target) as aclient:
            stream = await aclient.generate("The quick brown", model=model, max_new_tokens=5, do_sample=False,
                                            stream=True)
            return [m async for m in stream]

    assert [m.token.id for m in asyncio.run(stream_async()) if m.HasField("token")] == [t.id for t in tokens]


def test_generate_stream_closed_early_cancels(client, loaded):
    require_servicer("text_generation")
    model = loaded("gpt2")
    stream = client.generate("The quick brown", model=model, max_new_tokens=60, ignore_eos=True, stream=True)
    first = next(stream)
    assert first.HasField("token")
    stream.close()  # cancels the call; the server stops generating
    assert client.generate("The", model=model, max_new_tokens=2).sequences


def test_unimplemented_task_is_typed(monkeypatch):
    """A service whose servicer is missing from a build answers UNIMPLEMENTED, raised as
    UnimplementedError (a server without the fill-mask servicer stands in for such a build)."""
    from grpc_testing import make_server
    from pipeserve import server as server_module

    monkeypatch.setitem(server_module.SERVICES, "pipeserve.v1.FillMaskService",
                        ("pipeserve.api.not_in_this_build", None))
    server = make_server()
    try:
        with Client(server.address) as bare:
            with pytest.raises(UnimplementedError) as info:
                bare.fill_mask("a [MASK]")
        assert info.value.reason == "TASK_NOT_IMPLEMENTED" and not info.value.retryable
    finally:
        server.stop()


# --- lists of inputs, as the pipeline takes them -------------------------------------------

def _same_answer(batched, alone) -> bool:
    """Equal responses but for the server's request id and run details, scores equal to float32
    rounding (the server may batch the list's calls together)."""
    from google.protobuf.json_format import MessageToDict

    def same(a, b) -> bool:
        if isinstance(a, dict) and isinstance(b, dict):
            keys = (set(a) | set(b)) - {"requestId", "run"}
            return all(same(a.get(k), b.get(k)) for k in keys)
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, float) or isinstance(b, float):
            return abs(float(a) - float(b)) <= 1e-5
        return a == b

    return same(MessageToDict(batched), MessageToDict(alone))


def test_text_tasks_take_lists(client, loaded):
    require_servicer("text_classification")
    texts = ["Hugging Face is in Paris.", "I love it.", "The weather is bad today."]
    model = loaded("sequence_classification")
    got = client.classify_text(texts, model=model, top_k=2)
    assert isinstance(got, list) and len(got) == 3
    assert all(_same_answer(g, client.classify_text(t, model=model, top_k=2)) for g, t in zip(got, texts))

    require_servicer("zero_shot_classification")
    nli = loaded("nli")
    got = client.zero_shot(texts, ["places", "feelings"], model=nli)
    assert all(_same_answer(g, client.zero_shot(t, ["places", "feelings"], model=nli)) for g, t in zip(got, texts))

    require_servicer("question_answering")
    qa = loaded("question_answering")
    questions, contexts = ["Where is it?", "What is it?"], ["It is in Paris.", "It is a company."]
    paired = client.answer_question(questions, contexts, model=qa)
    assert all(_same_answer(g, client.answer_question(q, c, model=qa)) for g, q, c in zip(paired, questions, contexts))
    one_question = client.answer_question("Where is it?", contexts, model=qa)
    assert all(_same_answer(g, client.answer_question("Where is it?", c, model=qa))
               for g, c in zip(one_question, contexts))
    with pytest.raises(InputError, match="different lengths"):
        client.answer_question(questions, contexts + ["one more"], model=qa)

    require_servicer("feature_extraction")
    base = loaded("base")
    vectors = client.extract_features(texts, model=base, pooling="mean")
    assert all(_same_answer(g, client.extract_features(t, model=base, pooling="mean")) for g, t in zip(vectors, texts))


def test_list_failure_names_the_input(client, vit):
    with pytest.raises(InvalidArgumentError) as info:
        client.classify_image([_image(0), _image(1), b"not an image", _image(2)], model=vit)
    assert info.value.index == 2 and str(info.value).startswith("input 2: ")
    assert len(client.classify_image([_image(0), _image(1)], model=vit, top_k=1)) == 2  # the server still serves


def test_transcribe_takes_a_list_in_both_clients(client, loaded):
    require_servicer("speech_recognition")
    model = loaded("ctc")
    clips = [_speech(1.0), _speech(2.0)]
    alone = [client.transcribe(c, sampling_rate=16000, model=model) for c in clips]
    got = client.transcribe(clips, sampling_rate=16000, model=model)
    assert [g.transcription.text for g in got] == [a.transcription.text for a in alone]
    assert [g.transcription.duration_s for g in got] == pytest.approx([1.0, 2.0], abs=0.01)

    async def in_async():
        async with AsyncClient(client.target, timeout=120, max_concurrency=2) as aclient:
            return await aclient.transcribe(clips, sampling_rate=16000, model=model)

    assert [g.transcription.text for g in asyncio.run(in_async())] == [a.transcription.text for a in alone]
