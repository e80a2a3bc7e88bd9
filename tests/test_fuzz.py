"""Fuzzing (hypothesis, bounded and derandomized so the run is repeatable; about 45 s on the
shared 2-core machine): the image decoder and the audio decoders get random and mutated files
and must answer with a result or a typed PipeserveError. Against a live server process with a
model behind every task: every request message of every service is sent as random bytes, as
random field values built from its descriptor, and field by field at each field's boundary
values (nested and repeated items included, oversized lists); live streams get scripted and
random message sequences (bad configs, audio before config, huge channel counts and rates).
The answer must never be INTERNAL/UNKNOWN (a crash), DEADLINE_EXCEEDED (a hang) or
UNAVAILABLE; the process must stay alive and SERVING, and its RSS within a bounded slack of
its post-warm-up baseline. A last check: every task-request field has a bound in
pipeserve.api.limits."""
from __future__ import annotations

import io
import math
import struct

import grpc
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grpc_testing import load_model
from ops_testing import build_tiny_vit, png

pytest.importorskip("transformers")

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
CRASH_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
               grpc.StatusCode.UNAVAILABLE}


def mutated(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """A valid file with a few bytes overwritten, a slice cut out, or its tail cut off."""
    @st.composite
    def build(draw):
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(0, 6))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        if draw(st.booleans()):
            start = draw(st.integers(0, len(data)))
            del data[start:start + draw(st.integers(0, 64))]
        if draw(st.booleans()):
            data = data[: draw(st.integers(0, len(data)))]
        return bytes(data)
    return build()


# ---- the image decoder ----------------------------------------------------------------------------
def _image_seeds() -> list[bytes]:
    from PIL import Image

    image = Image.open(io.BytesIO(png(1, (24, 16))))
    out = []
    for fmt, extra in [("PNG", {}), ("JPEG", {}), ("GIF", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {}),
                       ("PNG", {"mode": "RGBA"}), ("TIFF", {"compression": "tiff_lzw"})]:
        buffer = io.BytesIO()
        (image.convert(extra["mode"]) if "mode" in extra else image).save(
            buffer, format=fmt, **{k: v for k, v in extra.items() if k != "mode"})
        out.append(buffer.getvalue())
    return out


IMAGE_SEEDS = _image_seeds()


@FUZZ
@given(st.one_of(st.binary(max_size=512), mutated(IMAGE_SEEDS)))
def test_image_decoder_answers_an_image_or_a_typed_error(data):
    from pipeserve.errors import PipeserveError
    from pipeserve.inputs.image import decode_image

    try:
        image = decode_image(data, max_pixels=1 << 20)
    except PipeserveError as exc:
        assert exc.code == grpc.StatusCode.INVALID_ARGUMENT and exc.message
        return
    assert image.mode == "RGB" and image.width * image.height <= 1 << 20


# ---- the audio decoders ---------------------------------------------------------------------------
def _audio_seeds() -> list[bytes]:
    import numpy as np
    import soundfile as sf

    tone = (0.3 * np.sin(np.arange(1600) / 8.0)).astype("float32")
    out = []
    for fmt, subtype in [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", "PCM_16"), ("OGG", "VORBIS")]:
        buffer = io.BytesIO()
        sf.write(buffer, np.stack([tone, tone[::-1]], axis=1), 8000, format=fmt, subtype=subtype)
        out.append(buffer.getvalue())
    return out


AUDIO_SEEDS = _audio_seeds()


@FUZZ
@given(st.one_of(st.binary(max_size=512), mutated(AUDIO_SEEDS)))
def test_audio_decoder_answers_samples_or_a_typed_error(data):
    from pipeserve.inputs.audio import load_audio_input
    from pipeserve.errors import PipeserveError

    try:
        wave = load_audio_input(data=data, max_seconds=30.0)
    except PipeserveError as exc:
        assert exc.code == grpc.StatusCode.INVALID_ARGUMENT and exc.message
        return
    assert wave.dim() == 1 and bool(wave.isfinite().all())


@FUZZ
@given(samples=st.binary(max_size=256), fmt=st.sampled_from(["float32", "int16", "FLOAT32", "pcm_s16le", "", "x"]),
       rate=st.one_of(st.integers(-10, 10), st.integers(-(1 << 31), (1 << 31) - 1),
                      st.sampled_from([8000, 16000, 44100, 768_001])),
       channels=st.integers(-3, 100))
def test_raw_pcm_decoder_answers_samples_or_a_typed_error(samples, fmt, rate, channels):
    from pipeserve.inputs.audio import load_audio_input
    from pipeserve.errors import PipeserveError

    try:
        wave = load_audio_input(samples=samples, fmt=fmt, sample_rate=rate, channels=channels, max_seconds=30.0)
    except PipeserveError as exc:
        assert exc.code == grpc.StatusCode.INVALID_ARGUMENT and exc.message
        return
    assert wave.dim() == 1 and bool(wave.isfinite().all())


# ---- every request message against a live server -------------------------------------------------
# The server runs in its own process, so a crash is seen as a dead process and its memory is
# its own: RSS is read from /proc/<pid>/status before the fuzzing and after it.
RSS_SLACK = 384 << 20  # allocator pools, caches of the models' first batches of each shape


class _Live:
    def __init__(self, process) -> None:
        self.process = process
        self.channel = grpc.insecure_channel(process.address, options=[
            ("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)])

    @property
    def pid(self) -> int:
        return self.process.pid


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A server process with real models behind the image, text-generation, speech,
    text-classification and question-answering services, so fuzzed requests that name them
    (or name none) reach the pipelines, not just the model lookup. Yields (server, model names)."""
    from encoder_checkpoints import build_checkpoint
    from generation_checkpoints import build
    from ops_testing import ServerProcess
    import whisper_checkpoints as wc

    from pipeserve.v1 import model_pb2
    from zero_shot_docqa_checkpoints import build_encoder_nli, build_layoutlm_qa

    root = tmp_path_factory.mktemp("fuzz_models")
    paths = {"vit": build_tiny_vit(root / "vit"), "gpt2": root / "gpt2",
             "whisper": wc.build(root / "whisper", multilingual=False),
             "bert": build_checkpoint("bert", "sequence_classification", root / "bert")[0],
             "qa": build_checkpoint("distilbert", "question_answering", root / "qa", model_max_length=64)[0],
             "ner": build_checkpoint("bert", "token_classification", root / "ner")[0],
             "mlm": build_checkpoint("bert", "masked_lm", root / "mlm")[0],
             "features": build_checkpoint("bert", "base", root / "features")[0],
             "nli": build_encoder_nli("bert", root / "nli"), "docqa": build_layoutlm_qa(root / "docqa")}
    build("gpt2", paths["gpt2"])
    tasks = {"nli": model_pb2.TASK_ZERO_SHOT_CLASSIFICATION, "features": model_pb2.TASK_FEATURE_EXTRACTION}
    process = ServerProcess("--hub-offline", "true", "--max-batch-wait-ms", "1", "--max-queue", "64")
    try:
        process.wait_serving()
        handle = _Live(process)
        models = {key: load_model(handle, path, **({"task": tasks[key]} if key in tasks else {})).name
                  for key, path in paths.items()}
        _warm_up(handle, models)
        handle.baseline_rss = rss_bytes(process.pid)
        yield handle, models
        handle.channel.close()
    finally:
        process.terminate()
        process.kill()


def rss_bytes(pid: int) -> int:
    from ops_testing import rss_bytes as read

    return read(pid)


def _methods():
    """(full method path, request class, client streaming, server streaming) of every RPC."""
    import importlib
    from pathlib import Path

    from google.protobuf import message_factory

    import pipeserve.v1

    out = []
    for path in sorted(Path(pipeserve.v1.__file__).parent.glob("*_pb2.py")):
        module = importlib.import_module(f"pipeserve.v1.{path.stem}")
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                out.append((f"/{service.full_name}/{method.name}",
                            message_factory.GetMessageClass(method.input_type),
                            method.client_streaming, method.server_streaming))
    return out


METHODS = _methods()
IDS = [m[0].rsplit(".", 1)[-1] for m in METHODS]
EXAMPLES = 30  # random examples per method
# What a random value of each scalar field type is drawn from: edges and overflow included.
_INT32 = st.one_of(st.integers(-3, 300), st.integers(-(1 << 31), (1 << 31) - 1))
_INT64 = st.one_of(st.integers(-3, 300), st.integers(-(1 << 63), (1 << 63) - 1))
_FLOAT = st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, math.inf, -math.inf, math.nan, 1e30, 1e-30]),
                   st.floats(width=32))
_TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "[MASK]", "<mask>", "\x00", "a" * 5000, "../../etc"]))
HUGE_TEXT = "a" * (2 << 20)  # 2 MiB: past every text bound, well inside the message limit
HUGE_BYTES = bytes(range(256)) * (8 << 10)  # 2 MiB
OVERSIZED = 20_000  # items in an oversized repeated field


def _field_strategy(field, model_names: list[str], depth: int):
    from google.protobuf.descriptor import FieldDescriptor as F

    if field.type == F.TYPE_MESSAGE:
        if field.message_type.full_name == "google.protobuf.Struct":
            return st.dictionaries(st.text(max_size=12), st.one_of(st.integers(-5, 1 << 40), _FLOAT, _TEXT,
                                                                   st.booleans()), max_size=4)
        if depth >= 3 or field.message_type.GetOptions().map_entry:
            return st.none()
        return _message_strategy(field.message_type, model_names, depth + 1)
    if field.type == F.TYPE_STRING:
        if field.name == "model" and model_names:
            return st.one_of(st.sampled_from(model_names), _TEXT)
        return _TEXT
    if field.type == F.TYPE_BYTES:
        return st.one_of(st.binary(max_size=300), st.sampled_from(IMAGE_SEEDS + AUDIO_SEEDS),
                         mutated(IMAGE_SEEDS + AUDIO_SEEDS))
    if field.type == F.TYPE_BOOL:
        return st.booleans()
    if field.type == F.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-2, 50))
    if field.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return _FLOAT
    if field.type in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return _INT64
    if field.type in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return st.one_of(st.integers(0, 300), st.integers(0, (1 << 32) - 1))
    if field.type in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return st.one_of(st.integers(0, 300), st.integers(0, (1 << 64) - 1))
    return _INT32


def _repeated(field) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 6 (`label` is gone from upb descriptors)
        return field.is_repeated
    return field.label == field.LABEL_REPEATED


def _message_strategy(descriptor, model_names: list[str], depth: int = 0):
    """Random values for a random subset of the message's fields (repeated ones as short lists)."""
    from google.protobuf.descriptor import FieldDescriptor as F

    fields = {}
    for field in descriptor.fields:
        one = _field_strategy(field, model_names, depth)
        fields[field.name] = st.lists(one, max_size=3) if _repeated(field) else one

    def build(values: dict):
        from google.protobuf import message_factory

        message = message_factory.GetMessageClass(descriptor)()
        for name, value in values.items():
            field = descriptor.fields_by_name[name]
            if value is None or (_repeated(field) and field.type == F.TYPE_MESSAGE):
                if _repeated(field) and value:
                    for item in value:
                        if item is not None:
                            getattr(message, name).add().CopyFrom(item)
                continue
            if field.type == F.TYPE_MESSAGE:
                if field.message_type.full_name == "google.protobuf.Struct":
                    getattr(message, name).update(value)
                else:
                    getattr(message, name).CopyFrom(value)
            elif _repeated(field):
                getattr(message, name).extend(value)
            else:
                try:
                    setattr(message, name, value)
                except ValueError:  # an enum value proto3 accepts on the wire but Python refuses to set
                    pass
        return message

    return st.fixed_dictionaries({}, optional=fields).map(build)


def _pcm(seconds: float, rate: int = 16000) -> bytes:
    import numpy as np

    return (0.1 * np.sin(np.arange(int(seconds * rate)) / 5.0)).astype("<f4").tobytes()


def _valid_bases(models) -> dict:
    """A valid request per method whose model the fuzz server holds: random and boundary
    fields are set on top of these, so fuzzed options and inputs reach the pipelines, not
    only validation."""
    from pipeserve.v1 import (common_pb2, document_question_answering_pb2 as docqa_pb, feature_extraction_pb2 as fe_pb,
                              fill_mask_pb2 as fm_pb, image_classification_pb2 as image_pb,
                              question_answering_pb2 as qa_pb, speech_recognition_pb2 as asr_pb,
                              text_classification_pb2 as text_pb, text_generation_pb2 as gen_pb,
                              token_classification_pb2 as tok_pb, zero_shot_classification_pb2 as zs_pb)

    options = gen_pb.GenerationOptions(max_new_tokens=4)
    audio = common_pb2.AudioInput(raw=common_pb2.RawAudio(samples=_pcm(0.5), format=1, sample_rate=16000))
    asr_options = asr_pb.TranscriptionOptions(max_new_tokens=4)
    return {
        "/pipeserve.v1.ImageClassificationService/ClassifyImage": image_pb.ClassifyImageRequest(
            model=models["vit"], image=common_pb2.ImageInput(data=png(3))),
        "/pipeserve.v1.TextGenerationService/Generate": gen_pb.GenerateRequest(
            model=models["gpt2"], prompt="Hello there", options=options),
        "/pipeserve.v1.TextGenerationService/GenerateStream": gen_pb.GenerateStreamRequest(
            model=models["gpt2"], prompt="Hello there", options=options),
        "/pipeserve.v1.SpeechRecognitionService/Transcribe": asr_pb.TranscribeRequest(
            model=models["whisper"], audio=audio, options=asr_options),
        "/pipeserve.v1.SpeechRecognitionService/TranscribeStream": asr_pb.TranscribeStreamRequest(
            model=models["whisper"], audio=audio, options=asr_options),
        "/pipeserve.v1.TextClassificationService/ClassifyText": text_pb.ClassifyTextRequest(
            model=models["bert"], text="a fine day"),
        "/pipeserve.v1.QuestionAnsweringService/AnswerQuestion": qa_pb.AnswerQuestionRequest(
            model=models["qa"], question="who?", context="Ann wrote it."),
        "/pipeserve.v1.TokenClassificationService/ClassifyTokens": tok_pb.ClassifyTokensRequest(
            model=models["ner"], text="Ann lives in Paris"),
        "/pipeserve.v1.FillMaskService/FillMask": fm_pb.FillMaskRequest(model=models["mlm"], text="a [MASK] day"),
        "/pipeserve.v1.FeatureExtractionService/ExtractFeatures": fe_pb.ExtractFeaturesRequest(
            model=models["features"], text="a fine day"),
        "/pipeserve.v1.ZeroShotClassificationService/ClassifyZeroShot": zs_pb.ClassifyZeroShotRequest(
            model=models["nli"], sequence="a fine day", candidate_labels=["weather", "sport"]),
        "/pipeserve.v1.DocumentQuestionAnsweringService/AnswerDocumentQuestion": docqa_pb.AnswerDocumentQuestionRequest(
            model=models["docqa"], question="what is the total?", words=[
                docqa_pb.DocumentWord(text="total", box=docqa_pb.BoundingBox(x0=10, y0=10, x1=80, y1=40)),
                docqa_pb.DocumentWord(text="42", box=docqa_pb.BoundingBox(x0=90, y0=10, x1=120, y1=40))]),
    }


def _live_config(models, **fields):
    from pipeserve.v1 import speech_recognition_pb2 as pb

    config = pb.StreamingConfig(model=models["whisper"], format=1, sample_rate=16000, channels=1,
                                options=pb.TranscriptionOptions(max_new_tokens=4))
    for name, value in fields.items():
        setattr(config, name, value)
    return pb.StreamingTranscribeRequest(config=config)


def _on_base(base):
    def merge(message):
        merged = type(base)()
        merged.CopyFrom(base)
        merged.MergeFrom(message)
        return merged
    return merge


def _call(live, path: str, client_streaming: bool, server_streaming: bool, payloads: list[bytes]):
    """Sends raw request bytes; returns (status code, details) (OK when it finished normally)."""
    channel, identity = live.channel, (lambda b: b)
    timeout = 60
    try:
        if client_streaming and server_streaming:
            list(channel.stream_stream(path, identity, identity)(iter(payloads), timeout=timeout))
        elif client_streaming:
            channel.stream_unary(path, identity, identity)(iter(payloads), timeout=timeout)
        elif server_streaming:
            list(channel.unary_stream(path, identity, identity)(payloads[0], timeout=timeout))
        else:
            channel.unary_unary(path, identity, identity)(payloads[0], timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def _still_serving(live) -> None:
    assert live.process.process.poll() is None, f"the server died:\n{live.process.output()[-3000:]}"
    status = health_pb2_grpc.HealthStub(live.channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def _warm_up(live, models) -> None:
    """One valid call per method with a base, so the RSS baseline holds every model's
    first-call allocations (thread pools, allocator arenas, the first batch shapes)."""
    for path, base in _valid_bases(models).items():
        method = next(m for m in METHODS if m[0] == path)
        for _ in range(2):
            code, details = _call(live, path, method[2], method[3], [base.SerializeToString()])
            assert code == grpc.StatusCode.OK, (path, code, details)
    code, details = _call(live, "/pipeserve.v1.SpeechRecognitionService/StreamingTranscribe", True, True,
                          [_live_config(models).SerializeToString(), _audio_chunk(_pcm(0.5))])
    assert code == grpc.StatusCode.OK, details


def _audio_chunk(samples: bytes) -> bytes:
    from pipeserve.v1 import speech_recognition_pb2 as pb

    return pb.StreamingTranscribeRequest(audio=pb.AudioChunk(samples=samples)).SerializeToString()


def _model_names(path: str, models) -> list[str]:
    # ModelService writes get random model names only: unloading the fuzz models would leave
    # the task services answering NOT_FOUND instead of exercising the pipelines.
    return [] if "ModelService" in path else ["", *models.values()]


@pytest.mark.parametrize("path,request_class,client_streaming,server_streaming", METHODS, ids=IDS)
def test_random_requests_never_crash_or_hang_the_server(live, path, request_class, client_streaming,
                                                        server_streaming):
    live, models = live
    seen: dict[str, int] = {}
    random_message = _message_strategy(request_class.DESCRIPTOR, _model_names(path, models))
    sources = [st.binary(max_size=200), random_message]
    base = _valid_bases(models).get(path)
    if base is not None:
        sources.append(random_message.map(_on_base(base)))
    messages = st.one_of(*sources).map(lambda m: m if isinstance(m, bytes) else m.SerializeToString())

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(messages, min_size=1, max_size=3))
    def run(payloads):
        code, details = _call(live, path, client_streaming, server_streaming, payloads)
        seen[code.name] = seen.get(code.name, 0) + 1
        assert code not in CRASH_CODES, f"{path} answered {code.name}: {details}"

    run()
    _still_serving(live)
    assert sum(seen.values()) >= EXAMPLES, seen
    if base is not None:  # the fuzz reached the model, not only request validation
        assert seen.get("OK", 0) > 0, seen


# ---- boundary values, field by field ---------------------------------------------------------------
def _boundaries(field) -> list:
    """The edge values of one field's type: zero, -1, the type's extremes, non-finite and huge
    floats, empty and huge strings and bytes, an undefined enum number."""
    from google.protobuf.descriptor import FieldDescriptor as F

    t = field.type
    if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
        return [0, -1, (1 << 31) - 1, -(1 << 31)]
    if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return [0, -1, (1 << 63) - 1, -(1 << 63)]
    if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return [0, (1 << 32) - 1]
    if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return [0, (1 << 64) - 1]
    if t == F.TYPE_FLOAT:
        return [0.0, -1.0, math.nan, math.inf, -math.inf, 3.4e38]
    if t == F.TYPE_DOUBLE:
        return [0.0, -1.0, math.nan, math.inf, -math.inf, 1.7e308]
    if t == F.TYPE_STRING:
        return ["", HUGE_TEXT]
    if t == F.TYPE_BYTES:
        return [b"", HUGE_BYTES]
    if t == F.TYPE_BOOL:
        return [True]
    if t == F.TYPE_ENUM:
        return [0, field.enum_type.values[-1].number, 999]
    return []


def _field_paths(descriptor, prefix: tuple = (), depth: int = 0):
    """(path of field names, field) for every field, nested messages (and the items of
    repeated ones) included."""
    for field in descriptor.fields:
        path = prefix + (field.name,)
        yield path, field
        if (field.type == field.TYPE_MESSAGE and depth < 3
                and field.message_type.full_name != "google.protobuf.Struct"):
            yield from _field_paths(field.message_type, path, depth + 1)


def _with_value(base, path: tuple, field, value, repeated_count: int | None):
    """A copy of `base` with the field at `path` set to `value` (or, for a repeated field, to
    `repeated_count` copies of it); a message field is set present but empty."""
    message = type(base)()
    message.CopyFrom(base)
    target = message
    for name in path[:-1]:
        child = getattr(target, name)
        if _repeated(target.DESCRIPTOR.fields_by_name[name]):  # a list of messages: its first item
            child = child[0] if len(child) else child.add()
        target = child
    name = path[-1]
    if _repeated(field):
        container = getattr(target, name)
        del container[:]
        if field.type == field.TYPE_MESSAGE:
            for _ in range(repeated_count or 0):
                container.add()
        else:
            container.extend([value] * (repeated_count or 0))
    elif field.type == field.TYPE_MESSAGE:
        getattr(target, name).SetInParent()
        getattr(target, name).Clear()
        getattr(target, name).SetInParent()
    else:
        try:
            setattr(target, name, value)
        except ValueError:  # an open enum's undefined number: set it on the wire instead
            return None
    return message


def _boundary_requests(request_class, base):
    """Every field of the request (nested ones too) at each of its boundary values, one at a
    time on top of the valid base; repeated fields empty, with one item, and oversized."""
    out = []
    for path, field in _field_paths(request_class.DESCRIPTOR):
        label = ".".join(path)
        if _repeated(field):
            # One item at each boundary value, then an oversized list of short items.
            for value in ([None] if field.type == field.TYPE_MESSAGE else _boundaries(field)):
                out.append((f"{label}=[{value!r:.20}]", _with_value(base, path, field, value, 1)))
            short = {str: "x", bytes: b"x"}
            boundaries = _boundaries(field)
            item = short.get(type(boundaries[0]), boundaries[-1]) if boundaries else None
            out.append((f"{label} x{OVERSIZED}", _with_value(base, path, field, item, OVERSIZED)))
            continue
        values = [None] if field.type == field.TYPE_MESSAGE else _boundaries(field)
        for value in values:
            message = _with_value(base, path, field, value, None)
            if message is not None:
                out.append((f"{label}={value!r:.20}", message))
    return out


UNARY_LIKE = [m for m in METHODS if not m[2]]


@pytest.mark.parametrize("path,request_class,client_streaming,server_streaming", UNARY_LIKE,
                         ids=[m[0].rsplit(".", 1)[-1] for m in UNARY_LIKE])
def test_every_field_at_its_boundary_values(live, path, request_class, client_streaming, server_streaming):
    """0, -1, the integer extremes, NaN, inf, huge floats, empty and 2 MiB strings and bytes,
    undefined enum numbers and 20,000-item repeated fields: each answered with a status that is
    not a crash, quickly, the server still serving."""
    live, models = live
    if "ModelService/Unload" in path or "ModelService/Load" in path:
        base = request_class(model="fuzz-model-that-is-not-loaded")
    else:
        base = _valid_bases(models).get(path) or request_class()
    seen: dict[str, int] = {}
    for label, message in _boundary_requests(request_class, base):
        code, details = _call(live, path, client_streaming, server_streaming, [message.SerializeToString()])
        seen[code.name] = seen.get(code.name, 0) + 1
        assert code not in CRASH_CODES, f"{path} with {label} answered {code.name}: {details}"
        assert len(details) < 4096, f"{path} with {label}: a {len(details)}-character error message"
    _still_serving(live)
    assert sum(seen.values()) > 0


# ---- live streams --------------------------------------------------------------------------------
def _stream_scenarios(models) -> dict[str, list[bytes]]:
    from pipeserve.v1 import speech_recognition_pb2 as pb

    config = lambda **f: _live_config(models, **f).SerializeToString()  # noqa: E731
    second = 16000 * 4  # bytes of one second of float32 mono
    return {
        "huge_channels_then_audio": [config(channels=(1 << 31) - 1), _audio_chunk(_pcm(0.2))],
        "negative_channels": [config(channels=-(1 << 31)), _audio_chunk(_pcm(0.2))],
        "huge_rate_then_audio": [config(sample_rate=(1 << 31) - 1), _audio_chunk(_pcm(0.2))],
        "rate_one_then_audio": [config(sample_rate=1), _audio_chunk(b"\0" * 6400)],
        "rate_zero": [config(sample_rate=0), _audio_chunk(_pcm(0.2))],
        "no_format": [config(format=0), _audio_chunk(_pcm(0.2))],
        "audio_before_config": [_audio_chunk(_pcm(0.2)), config()],
        "only_audio": [_audio_chunk(_pcm(0.2))] * 3,
        "nothing": [],
        "config_only": [config()],
        "two_configs": [config(), config()],
        "config_audio_config": [config(), _audio_chunk(_pcm(0.2)), config()],
        "partial_frame": [config(), _audio_chunk(b"\0" * 7)],
        "empty_chunks": [config(), _audio_chunk(b""), _audio_chunk(b"")],
        "chunk_over_30_s": [config(), _audio_chunk(b"\0" * (31 * second))],
        "nan_samples": [config(), _audio_chunk(b"\x00\x00\xc0\x7f" * 1600)],
        "interim_nan": [config(interim_interval_s=math.nan), _audio_chunk(_pcm(0.2))],
        "interim_zero": [config(interim_interval_s=0.0), _audio_chunk(_pcm(0.2))],
        "interim_huge": [config(interim_interval_s=3.4e38), _audio_chunk(_pcm(0.2))],
        "int16_64_channels": [config(format=2, channels=64), _audio_chunk(b"\0" * 2 * 64 * 800)],
        "rate_8k": [config(sample_rate=8000), _audio_chunk(_pcm(0.3, 8000))],
        "bad_options": [pb.StreamingTranscribeRequest(config=pb.StreamingConfig(
            model=models["whisper"], format=1, sample_rate=16000, options=pb.TranscriptionOptions(
                num_beams=(1 << 31) - 1, temperature_fallback=[math.nan] * 100))).SerializeToString(),
            _audio_chunk(_pcm(0.2))],
        "garbage_message": [b"\xff\xff\xff", _audio_chunk(_pcm(0.2))],
    }


def test_scripted_live_streams_get_a_status_not_a_crash(live):
    live, models = live
    path = "/pipeserve.v1.SpeechRecognitionService/StreamingTranscribe"
    outcomes = {}
    for name, payloads in _stream_scenarios(models).items():
        code, details = _call(live, path, True, True, payloads)
        outcomes[name] = code.name
        assert code not in CRASH_CODES, f"{name} answered {code.name}: {details}"
    _still_serving(live)
    assert outcomes["huge_channels_then_audio"] == outcomes["rate_one_then_audio"] == "INVALID_ARGUMENT"
    assert outcomes["audio_before_config"] == outcomes["two_configs"] == "INVALID_ARGUMENT"
    assert outcomes["int16_64_channels"] == outcomes["rate_8k"] == outcomes["config_only"] == "OK", outcomes


def test_random_live_streams(live):
    """A random config (boundary numbers included) and then random chunks, or chunks first."""
    from pipeserve.v1 import speech_recognition_pb2 as pb

    live, models = live
    path = "/pipeserve.v1.SpeechRecognitionService/StreamingTranscribe"
    numbers = st.one_of(st.sampled_from([0, -1, 1, 4000, 16000, 192_000, 192_001, (1 << 31) - 1, -(1 << 31)]),
                        st.integers(-(1 << 31), (1 << 31) - 1))
    configs = st.builds(
        lambda rate, channels, fmt, interim, options: _live_config(
            models, sample_rate=rate, channels=channels, format=fmt,
            **({"interim_interval_s": interim} if interim is not None else {})).SerializeToString()
        if options is None else pb.StreamingTranscribeRequest(config=pb.StreamingConfig(
            model=models["whisper"], format=fmt, sample_rate=rate, channels=channels,
            options=options)).SerializeToString(),
        numbers, numbers, st.integers(0, 3), st.one_of(st.none(), _FLOAT),
        st.one_of(st.none(), _message_strategy(pb.TranscriptionOptions.DESCRIPTOR, [])))
    chunks = st.one_of(st.binary(max_size=4000).map(_audio_chunk), st.sampled_from([_audio_chunk(_pcm(0.3))]))
    streams = st.one_of(st.tuples(configs, st.lists(chunks, max_size=3)).map(lambda t: [t[0], *t[1]]),
                        st.lists(st.one_of(configs, chunks), max_size=3))

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(streams)
    def run(payloads):
        code, details = _call(live, path, True, True, payloads)
        assert code not in CRASH_CODES, f"answered {code.name}: {details}"

    run()
    _still_serving(live)


def test_undefined_enum_numbers_are_invalid_argument(live):
    """Proto3 enums are open on the wire; a number the contract does not define is refused
    before any servicer runs, naming the field (the fuzz above found KeyError/ValueError
    INTERNALs in servicers before this check existed)."""
    from grpc_testing import error_reason
    from pipeserve.v1 import model_pb2

    live, _ = live
    request = model_pb2.ListModelsRequest()
    request.task = 999  # Python keeps unknown numbers of open enums
    with pytest.raises(grpc.RpcError) as error:
        live.channel.unary_unary("/pipeserve.v1.ModelService/ListModels")(request.SerializeToString(), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error.value) == "INVALID_ENUM_VALUE"
    assert "task = 999" in error.value.details() and "pipeserve.v1.Task" in error.value.details()
    _still_serving(live)


def test_zz_server_memory_after_the_fuzz_stays_near_its_baseline(live):
    """Runs last in this file (pytest keeps file order): everything above left the server's
    RSS within a bounded slack of the post-warm-up baseline."""
    live, _ = live
    _still_serving(live)
    grown = rss_bytes(live.pid) - live.baseline_rss
    print(f"server RSS: {live.baseline_rss / (1 << 20):.0f} MiB after warm-up, {grown / (1 << 20):+.0f} MiB after the fuzz")
    assert grown < RSS_SLACK, f"server RSS grew by {grown / (1 << 20):.0f} MiB during the fuzz"


def test_every_task_request_field_has_a_bound():
    """The shared validator's table (pipeserve.api.limits) covers every numeric, string, bytes
    and repeated field of every task request message, nested messages included, so a field
    added to a contract without a bound fails here."""
    from google.protobuf.descriptor import FieldDescriptor as F

    from pipeserve.api import limits

    missing = []

    def visit(descriptor, seen):
        if descriptor.full_name in seen or descriptor.full_name.startswith("google.protobuf"):
            return
        seen.add(descriptor.full_name)
        rules = limits.RULES.get(descriptor.full_name, {})
        for field in descriptor.fields:
            if field.name in limits.UNBOUNDED_BY_DESIGN:
                continue
            needs_rule = _repeated(field) or field.type not in (F.TYPE_BOOL, F.TYPE_ENUM, F.TYPE_MESSAGE)
            if (needs_rule or field.type == F.TYPE_MESSAGE) and field.name not in rules:
                missing.append(f"{descriptor.full_name}.{field.name}")
            if field.type == F.TYPE_MESSAGE:
                visit(field.message_type, seen)

    seen: set = set()
    for path, request_class, _, _ in METHODS:
        if "/pipeserve.v1.ModelService/" not in path:  # model names and load options: pipeserve.serving.security
            visit(request_class.DESCRIPTOR, seen)
    assert not missing, f"request fields with no bound in pipeserve.api.limits: {missing}"
