"""Python arguments (named as transformers.pipeline names them) -> request messages.
Shared by the sync and asyncio clients so both build exactly the same requests."""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence, TypedDict

from google.protobuf import struct_pb2

from pipeserve.v1 import (
    document_question_answering_pb2 as docqa_pb,
    feature_extraction_pb2 as features_pb,
    fill_mask_pb2 as fill_mask_pb,
    image_classification_pb2 as image_pb,
    model_pb2,
    question_answering_pb2 as qa_pb,
    speech_recognition_pb2 as asr_pb,
    text_classification_pb2 as text_pb,
    text_generation_pb2 as gen_pb,
    token_classification_pb2 as tokens_pb,
    zero_shot_classification_pb2 as zero_shot_pb,
)
from pipeserve.v1 import common_pb2

from .errors import InputError
from .inputs import AudioLike, ImageLike, audio_input, image_input


def enum_value(enum: Any, prefix: str, value: Any, argument: str) -> int | None:
    """"word" -> TIMESTAMP_GRANULARITY_WORD; None stays None (the option is left unset)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    name = prefix + str(value).strip().upper().replace("-", "_")
    try:
        return enum.Value(name)
    except ValueError:
        choices = [n.removeprefix(prefix).lower() for n in enum.keys() if not n.endswith("UNSPECIFIED")]
        raise InputError(f"{argument} must be one of {', '.join(choices)}; got {value!r}") from None


def task_value(task: str | int | None) -> int | None:
    """"image-classification" (a pipeline task name) -> TASK_IMAGE_CLASSIFICATION."""
    return enum_value(model_pb2.Task, "TASK_", task, "task")


def _set(message: Any, **fields: Any) -> Any:
    """Sets only the fields whose value is not None (unset optional = the model's default)."""
    for name, value in fields.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            getattr(message, name).extend(value)
        else:
            setattr(message, name, value)
    return message


# --- models -------------------------------------------------------------------------------

def list_models(task: str | None = None) -> model_pb2.ListModelsRequest:
    return _set(model_pb2.ListModelsRequest(), task=task_value(task))


def load_model(model: str, *, task: str | None = None, revision: str | None = None, device: str | None = None,
               dtype: str | None = None, load_in_8bit: bool | None = None, allow_pickle: bool | None = None,
               set_default: bool | None = None, default_options: Mapping[str, Any] | None = None,
               weights_dtype: str | None = None, quantization: str | None = None) -> model_pb2.LoadModelRequest:
    request = _set(model_pb2.LoadModelRequest(model=str(model)), task=task_value(task), revision=revision,
                   device=device, dtype=enum_value(model_pb2.DType, "D_TYPE_", dtype, "dtype"),
                   weights_dtype=enum_value(model_pb2.DType, "D_TYPE_", weights_dtype, "weights_dtype"),
                   quantization=enum_value(model_pb2.Quantization, "QUANTIZATION_", quantization, "quantization"),
                   load_in_8bit=load_in_8bit, allow_pickle=allow_pickle, set_default=set_default)
    if default_options:
        struct = struct_pb2.Struct()
        struct.update(dict(default_options))
        request.default_options.CopyFrom(struct)
    return request


# --- speech recognition -------------------------------------------------------------------

class TranscribeOptions(TypedDict, total=False):
    """Keyword arguments of transcribe(); every option unset = the model's default."""

    sampling_rate: int | None  # required with raw samples (a numpy array)
    model: str  # empty = the task's default model
    return_timestamps: bool | str | None  # True (segments), "word", "char", False / "none"
    language: str | None  # e.g. "en"; unset = detected
    task: str | None  # "transcribe" or "translate"
    chunk_length_s: float | None
    stride_length_s: float | None
    batch_size: int | None
    num_beams: int | None
    temperature: float | Sequence[float] | None  # a sequence = fallback schedule
    compression_ratio_threshold: float | None
    logprob_threshold: float | None
    no_speech_threshold: float | None
    initial_prompt: str | None
    condition_on_previous_text: bool | None
    max_new_tokens: int | None
    long_form_sequential: bool | None
    request_id: str
    timeout: float | None  # deadline in seconds for the whole call, retries included


class GenerateOptions(TypedDict, total=False):
    """Keyword arguments of generate(); every option unset = the model's default."""

    model: str
    messages: Sequence[Any] | None
    max_new_tokens: int | None
    min_new_tokens: int | None
    do_sample: bool | None
    temperature: float | None
    top_k: int | None
    top_p: float | None
    typical_p: float | None
    repetition_penalty: float | None
    no_repeat_ngram_size: int | None
    stop: str | Sequence[str] | None
    ignore_eos: bool | None
    seed: int | None
    num_return_sequences: int | None
    return_full_text: bool | None
    logprobs: int | None
    return_logprobs: bool | None
    request_id: str
    timeout: float | None


def _split(method: str, options: Mapping[str, Any], allowed: type) -> tuple[dict[str, Any], float | None]:
    """Checks keyword names (as a signature would) and takes the deadline out."""
    names = allowed.__required_keys__ | allowed.__optional_keys__  # type: ignore[attr-defined]
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"{method}() got unexpected keyword argument(s): {', '.join(unknown)}")
    rest = dict(options)
    return rest, rest.pop("timeout", None)


def transcribe_call(audio: AudioLike, stream: bool, options: Mapping[str, Any]) -> tuple[Any, float | None]:
    """transcribe()'s keyword arguments -> (request, timeout)."""
    rest, timeout = _split("transcribe", options, TranscribeOptions)
    request = transcribe(audio, sampling_rate=rest.pop("sampling_rate", None), model=rest.pop("model", ""),
                         request_id=rest.pop("request_id", ""), stream=stream, options=rest)
    return request, timeout


def generate_call(prompt: str, stream: bool, options: Mapping[str, Any]) -> tuple[Any, float | None]:
    """generate()'s keyword arguments -> (request, timeout)."""
    rest, timeout = _split("generate", options, GenerateOptions)
    request = generate(prompt, model=rest.pop("model", ""), request_id=rest.pop("request_id", ""), stream=stream,
                       options=rest)
    return request, timeout

def _timestamps(value: bool | str | None) -> int | None:
    # transformers: return_timestamps=True -> segments, "word" -> words, "char" -> characters.
    if value is True:
        value = "segment"
    elif value is False:
        value = "none"
    return enum_value(asr_pb.TimestampGranularity, "TIMESTAMP_GRANULARITY_", value, "return_timestamps")


def transcription_options(*, return_timestamps: bool | str | None = None, language: str | None = None,
                          task: str | None = None, chunk_length_s: float | None = None,
                          stride_length_s: float | None = None, batch_size: int | None = None,
                          num_beams: int | None = None, temperature: float | Sequence[float] | None = None,
                          compression_ratio_threshold: float | None = None, logprob_threshold: float | None = None,
                          no_speech_threshold: float | None = None, initial_prompt: str | None = None,
                          condition_on_previous_text: bool | None = None, max_new_tokens: int | None = None,
                          long_form_sequential: bool | None = None) -> asr_pb.TranscriptionOptions:
    fallback = None
    if isinstance(temperature, (list, tuple)):
        # transformers' generate_kwargs temperature=(0.0, 0.2, ...) is a fallback schedule.
        schedule = list(temperature)
        temperature, fallback = (schedule[0] if schedule else None), schedule[1:]
    return _set(asr_pb.TranscriptionOptions(), return_timestamps=_timestamps(return_timestamps), language=language,
                task=enum_value(asr_pb.SpeechTask, "SPEECH_TASK_", task, "task"), chunk_length_s=chunk_length_s,
                stride_length_s=stride_length_s, batch_size=batch_size, num_beams=num_beams, temperature=temperature,
                temperature_fallback=fallback, compression_ratio_threshold=compression_ratio_threshold,
                logprob_threshold=logprob_threshold, no_speech_threshold=no_speech_threshold,
                initial_prompt=initial_prompt, condition_on_previous_text=condition_on_previous_text,
                max_new_tokens=max_new_tokens, long_form_sequential=long_form_sequential)


def transcribe(audio: AudioLike, *, sampling_rate: int | None, model: str, request_id: str, stream: bool,
               options: dict[str, Any]) -> asr_pb.TranscribeRequest | asr_pb.TranscribeStreamRequest:
    cls = asr_pb.TranscribeStreamRequest if stream else asr_pb.TranscribeRequest
    return cls(model=model, request_id=request_id, audio=audio_input(audio, sampling_rate),
               options=transcription_options(**options))


def live_requests(chunks: Iterable[Any], *, sampling_rate: int, channels: int, model: str, request_id: str,
                  interim_interval_s: float | None, options: dict[str, Any]):
    """Config first, then one AudioChunk per item (numpy float/int16 arrays or raw bytes)."""
    config = asr_pb.StreamingConfig(model=model, request_id=request_id, options=transcription_options(**options),
                                    sample_rate=int(sampling_rate), channels=int(channels))
    first = True
    for chunk in chunks:
        if isinstance(chunk, (bytes, bytearray, memoryview)):
            fmt, data = common_pb2.SAMPLE_FORMAT_FLOAT32_LE, bytes(chunk)
        else:
            import numpy as np  # only for arrays: bytes chunks work without numpy (no [audio] extra)

            array = np.asarray(chunk)
            fmt = common_pb2.SAMPLE_FORMAT_INT16_LE if array.dtype == np.int16 else common_pb2.SAMPLE_FORMAT_FLOAT32_LE
            data = array.astype("<i2" if array.dtype == np.int16 else "<f4").tobytes()
        if first:
            config.format = fmt
            _set(config, interim_interval_s=interim_interval_s)
            yield asr_pb.StreamingTranscribeRequest(config=config)
            first = False
        yield asr_pb.StreamingTranscribeRequest(audio=asr_pb.AudioChunk(samples=data))


# --- text generation ----------------------------------------------------------------------

def generate(prompt: str, *, model: str, request_id: str, stream: bool,
             options: dict[str, Any]) -> gen_pb.GenerateRequest | gen_pb.GenerateStreamRequest:
    stop = options.pop("stop", None)
    if isinstance(stop, str):
        stop = [stop]
    messages = chat_messages(options.pop("messages", None))
    if messages and prompt:
        raise InputError("generate() takes a prompt or messages, not both")
    cls = gen_pb.GenerateStreamRequest if stream else gen_pb.GenerateRequest
    return cls(model=model, request_id=request_id, prompt=prompt, messages=messages,
               options=_set(gen_pb.GenerationOptions(), stop=stop, **options))


def chat_messages(messages: Sequence[Any] | None) -> list[gen_pb.ChatMessage]:
    """A chat as transformers' pipeline takes it ({"role", "content"} dicts), or objects with
    role and content attributes (OpenAI SDK messages, ChatMessage) -> ChatMessage list."""
    if messages is None:
        return []
    if isinstance(messages, (str, bytes, Mapping)):
        raise InputError("messages must be a list of {'role': ..., 'content': ...} messages")
    chat = []
    for i, message in enumerate(messages):
        fields = message if isinstance(message, Mapping) else {
            name: getattr(message, name) for name in ("role", "content") if hasattr(message, name)}
        role, content = fields.get("role"), fields.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise InputError(f"messages[{i}] needs a 'role' and a 'content' string; got {str(message)[:80]}")
        chat.append(gen_pb.ChatMessage(role=role, content=content))
    if not chat:
        raise InputError("messages is empty: give at least one message")
    return chat


# --- images -------------------------------------------------------------------------------

def classify_image(image: ImageLike, *, model: str, request_id: str, top_k: int | None,
                   function_to_apply: str | None) -> image_pb.ClassifyImageRequest:
    return _set(image_pb.ClassifyImageRequest(model=model, request_id=request_id, image=image_input(image)),
                top_k=top_k, function_to_apply=_function(function_to_apply))


def _function(value: str | None) -> int | None:
    return enum_value(common_pb2.FunctionToApply, "FUNCTION_TO_APPLY_", value, "function_to_apply")


def document_qa(image: ImageLike, question: str, *, word_boxes: Sequence[Any] | None, model: str,
                request_id: str, options: dict[str, Any]) -> docqa_pb.AnswerDocumentQuestionRequest:
    words = []
    for item in word_boxes or ():
        # transformers' word_boxes: [(word, [x0, y0, x1, y1]), ...], boxes normalised to 0..1000.
        text, box = item
        x0, y0, x1, y1 = (int(v) for v in box)
        words.append(docqa_pb.DocumentWord(text=text, box=docqa_pb.BoundingBox(x0=x0, y0=y0, x1=x1, y1=y1)))
    request = docqa_pb.AnswerDocumentQuestionRequest(model=model, request_id=request_id, image=image_input(image),
                                                     question=question, words=words)
    return _set(request, **options)


# --- text ---------------------------------------------------------------------------------

def zero_shot(sequence: str, candidate_labels: Sequence[str] | str, *, model: str, request_id: str,
              hypothesis_template: str | None, multi_label: bool | None) -> zero_shot_pb.ClassifyZeroShotRequest:
    if isinstance(candidate_labels, str):
        # transformers accepts "a, b, c" as well as a list.
        candidate_labels = [label.strip() for label in candidate_labels.split(",") if label.strip()]
    return _set(zero_shot_pb.ClassifyZeroShotRequest(model=model, request_id=request_id, sequence=sequence,
                                                     candidate_labels=list(candidate_labels)),
                hypothesis_template=hypothesis_template, multi_label=multi_label)


def classify_text(text: str, *, text_pair: str | None, model: str, request_id: str, top_k: int | None,
                  function_to_apply: str | None) -> text_pb.ClassifyTextRequest:
    return _set(text_pb.ClassifyTextRequest(model=model, request_id=request_id, text=text), text_pair=text_pair,
                top_k=top_k, function_to_apply=_function(function_to_apply))


def classify_tokens(text: str, *, model: str, request_id: str, aggregation_strategy: str | None,
                    ignore_labels: Sequence[str] | None, stride: int | None) -> tokens_pb.ClassifyTokensRequest:
    strategy = enum_value(tokens_pb.AggregationStrategy, "AGGREGATION_STRATEGY_", aggregation_strategy,
                          "aggregation_strategy")
    return _set(tokens_pb.ClassifyTokensRequest(model=model, request_id=request_id, text=text),
                aggregation_strategy=strategy, ignore_labels=list(ignore_labels) if ignore_labels else None,
                stride=stride)


def answer_question(question: str, context: str, *, model: str, request_id: str,
                    options: dict[str, Any]) -> qa_pb.AnswerQuestionRequest:
    return _set(qa_pb.AnswerQuestionRequest(model=model, request_id=request_id, question=question, context=context),
                **options)


def fill_mask(text: str, *, model: str, request_id: str, top_k: int | None,
              targets: Sequence[str] | str | None) -> fill_mask_pb.FillMaskRequest:
    if isinstance(targets, str):
        targets = [targets]
    return _set(fill_mask_pb.FillMaskRequest(model=model, request_id=request_id, text=text), top_k=top_k,
                targets=list(targets) if targets else None)


def extract_features(text: str, *, model: str, request_id: str, pooling: str | None, normalize: bool | None,
                     truncate: bool | None) -> features_pb.ExtractFeaturesRequest:
    return _set(features_pb.ExtractFeaturesRequest(model=model, request_id=request_id, text=text),
                pooling=enum_value(features_pb.Pooling, "POOLING_", pooling, "pooling"), normalize=normalize,
                truncate=truncate)
