"""The one description of the client's methods, from which both Client and AsyncClient get
theirs (`python -m pipeserve_client._codegen` writes _client_methods.py and _aio_methods.py;
tests/test_client_methods.py fails when they are out of date).

Each function below describes one method: its signature and docstring are the method's (less
`self`), and its body turns the arguments into (request, timeout). METHODS says which RPC each
calls, how (unary, server stream, bidirectional), how a response becomes the result, and which
parameters also take a list of inputs (as the pipeline does: one call per input, a list of
results in input order)."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Unpack

from pipeserve.v1 import model_pb2

from . import _requests as build
from .errors import InputError
from .inputs import AudioLike, ImageLike

Call = tuple[Any, float | None]  # (the request, or an iterator of requests; the call's timeout)


class Kind(enum.Enum):
    UNARY = "unary"
    SERVER_STREAM = "server-stream"
    BIDI = "bidi"


@dataclass(frozen=True)
class MethodSpec:
    """describe: the function whose signature and docstring the method takes;
    service / rpc: the _services short name and RPC it calls;
    stream_rpc: a server-streaming RPC that `stream=True` calls instead (describe then takes
        `stream`, and the request it builds is the streaming RPC's);
    unpack: response -> result (None = the response itself);
    name: the method's name (default: describe's); group: "models" = a client.models method;
    batch: the parameters that also take a list (or tuple) of inputs: the method then makes
        one call per input (a list given for several of them is zipped, a single value
        repeated, as the question-answering pipeline pairs questions and contexts) and
        returns the list of results in order (see items_of)."""

    describe: Callable[..., Call]
    service: str
    rpc: str
    kind: Kind = Kind.UNARY
    stream_rpc: str | None = None
    unpack: Callable[[Any], Any] | None = None
    name: str = ""
    group: str = ""
    batch: tuple[str, ...] = ()

    @property
    def method_name(self) -> str:
        return self.name or self.describe.__name__

    @property
    def rpcs(self) -> tuple[str, ...]:
        return (self.rpc,) + ((self.stream_rpc,) if self.stream_rpc else ())


def items_of(method: str, inputs: Mapping[str, Any], stream: bool = False) -> list[dict[str, Any]] | None:
    """The arguments of each input's call when any of `inputs` (a batch parameter's name ->
    its value) is a list or tuple, else None (a call on one input). Lists given for several
    parameters must have the same length; a single value goes with every input."""
    lists = {name: list(value) for name, value in inputs.items() if isinstance(value, (list, tuple))}
    if not lists:
        return None
    if stream:
        raise InputError(f"{method}(stream=True) takes one input, not a list: stream each input in turn, "
                         f"or drop stream=True to get a list of results")
    lengths = {name: len(value) for name, value in lists.items()}
    if len(set(lengths.values())) > 1:
        given = ", ".join(f"{name}: {length}" for name, length in lengths.items())
        raise InputError(f"{method}() got lists of different lengths ({given}); give lists of one length, "
                         f"or a single value to pair with every input")
    count = next(iter(lengths.values()))
    return [{name: lists[name][index] if name in lists else value for name, value in inputs.items()}
            for index in range(count)]


# --- models -------------------------------------------------------------------------------

def list_models(task: str | None = None, *, timeout: float | None = None) -> Call:
    """The loaded models, optionally only those serving `task` (a pipeline task name)."""
    return build.list_models(task), timeout


def get_model(model: str, *, timeout: float | None = None) -> Call:
    """One loaded model's details (NotFoundError when it is not loaded)."""
    return model_pb2.GetModelRequest(model=model), timeout


def load_model(model: str, *, task: str | None = None, revision: str | None = None, device: str | None = None,
               dtype: str | None = None, load_in_8bit: bool | None = None, allow_pickle: bool | None = None,
               set_default: bool | None = None, default_options: Mapping[str, Any] | None = None,
               timeout: float | None = None, weights_dtype: str | None = None,
               quantization: str | None = None) -> Call:
    """Loads a local directory or Hub id; returns once the model is ready. Loading can
    take minutes for large models, so give a generous timeout. weights_dtype "float16" keeps
    float16 weights under a float32 model (about half its memory, slower; Whisper).
    quantization "none", "int8" or "grouped" (groups of 32 weights on grids of up to 256
    levels: a GGUF file's quantized values, 4-bit kernels; CPU, Gemma 3)."""
    request = build.load_model(model, task=task, revision=revision, device=device, dtype=dtype,
                               load_in_8bit=load_in_8bit, allow_pickle=allow_pickle, set_default=set_default,
                               default_options=default_options, weights_dtype=weights_dtype,
                               quantization=quantization)
    return request, timeout


def unload_model(model: str, *, timeout: float | None = None) -> Call:
    """Unloads a model and frees its memory; returns what it was."""
    return model_pb2.UnloadModelRequest(model=model), timeout


def models_of(response: model_pb2.ListModelsResponse) -> list[model_pb2.ModelInfo]:
    return list(response.models)


def model_of(response: Any) -> model_pb2.ModelInfo:
    return response.model


# --- speech recognition -------------------------------------------------------------------

def transcribe(audio: AudioLike, *, stream: bool = False, **options: Unpack[build.TranscribeOptions]) -> Call:
    """Speech -> text, like pipeline("automatic-speech-recognition")(audio, ...).

    audio: a file path, encoded file bytes, an allowlisted URI, a numpy array of samples
    (float -1..1 or int16; 2-D = (frames, channels)) with sampling_rate=, or
    {"raw": array, "sampling_rate": rate}. Options (TranscribeOptions): sampling_rate,
    model, return_timestamps (True = segments, "word", "char", False), language, task
    ("transcribe" / "translate"), chunk_length_s, stride_length_s, batch_size, num_beams,
    temperature (a sequence = fallback schedule), compression_ratio_threshold,
    logprob_threshold, no_speech_threshold, initial_prompt, condition_on_previous_text,
    max_new_tokens, long_form_sequential, request_id, timeout. stream=True yields
    TranscribeStreamResponse messages: a `segment` as each window is decoded, then `done`
    with the full transcription. A list of audio inputs -> a list of TranscribeResponse, in
    order (not with stream=True)."""
    return build.transcribe_call(audio, stream, options)


def transcribe_live(chunks: Iterable[Any], *, sampling_rate: int, channels: int = 1, model: str = "",
                    interim_interval_s: float | None = None, request_id: str = "", timeout: float | None = None,
                    **options: Any) -> Call:
    """Live audio: `chunks` yields numpy arrays (float32 or int16) or float32 PCM bytes as
    they are captured; yields interim and final segments, then `done` after the last chunk.
    Options are those of transcribe(). Client's stream also has cancel(), which ends the call
    from any thread (AsyncClient's: leave the loop, or cancel the task)."""
    requests: Iterator[Any] = build.live_requests(chunks, sampling_rate=sampling_rate, channels=channels,
                                                  model=model, request_id=request_id,
                                                  interim_interval_s=interim_interval_s, options=options)
    return requests, timeout


# --- text generation ----------------------------------------------------------------------

def generate(prompt: str = "", *, stream: bool = False, **options: Unpack[build.GenerateOptions]) -> Call:
    """Prompt -> continuation, like pipeline("text-generation")(prompt, ...); or, instead of
    a prompt, messages=[{"role": "user", "content": "..."}, ...]: a chat the model's chat
    template renders, answered with the assistant's reply. Options
    (GenerateOptions): model, messages, max_new_tokens, min_new_tokens, do_sample, temperature, top_k,
    top_p, typical_p, repetition_penalty, no_repeat_ngram_size, stop, ignore_eos, seed,
    num_return_sequences, return_full_text, logprobs, return_logprobs, request_id, timeout.
    stream=True yields one GenerateStreamResponse per token (`token`), then `done` per
    sequence. A list of prompts -> a list of GenerateResponse, in order (not with stream=True)."""
    return build.generate_call(prompt, stream, options)


# --- images -------------------------------------------------------------------------------

def classify_image(image: ImageLike, *, model: str = "", top_k: int | None = None,
                   function_to_apply: str | None = None, request_id: str = "",
                   timeout: float | None = None) -> Call:
    """Image (path, bytes, URI, PIL image) -> labels, like pipeline("image-classification").
    A list of images -> a list of responses, in order."""
    request = build.classify_image(image, model=model, request_id=request_id, top_k=top_k,
                                   function_to_apply=function_to_apply)
    return request, timeout


def document_qa(image: ImageLike, question: str, *, word_boxes: Sequence[Any] | None = None, model: str = "",
                top_k: int | None = None, max_answer_len: int | None = None, doc_stride: int | None = None,
                max_seq_len: int | None = None, max_question_len: int | None = None,
                handle_impossible_answer: bool | None = None, lang: str | None = None, request_id: str = "",
                timeout: float | None = None) -> Call:
    """Document image + question -> answers, like pipeline("document-question-answering").
    word_boxes=[(word, (x0, y0, x1, y1)), ...] (0..1000) skips the server's OCR. A list of
    images and/or of questions (paired in order; a single one goes with each) -> a list of
    responses, in order."""
    options = dict(top_k=top_k, max_answer_len=max_answer_len, doc_stride=doc_stride, max_seq_len=max_seq_len,
                   max_question_len=max_question_len, handle_impossible_answer=handle_impossible_answer,
                   ocr_lang=lang)
    request = build.document_qa(image, question, word_boxes=word_boxes, model=model, request_id=request_id,
                                options=options)
    return request, timeout


# --- text ---------------------------------------------------------------------------------

def zero_shot(sequences: str, candidate_labels: Sequence[str] | str, *, model: str = "",
              hypothesis_template: str | None = None, multi_label: bool | None = None, request_id: str = "",
              timeout: float | None = None) -> Call:
    """Text + labels of your choosing -> scores, like pipeline("zero-shot-classification").
    A list of texts -> a list of responses, in order (each scored against the same labels)."""
    request = build.zero_shot(sequences, candidate_labels, model=model, request_id=request_id,
                              hypothesis_template=hypothesis_template, multi_label=multi_label)
    return request, timeout


def classify_text(text: str, *, text_pair: str | None = None, model: str = "", top_k: int | None = None,
                  function_to_apply: str | None = None, request_id: str = "", timeout: float | None = None) -> Call:
    """Text (or a pair) -> labels, like pipeline("text-classification"). A list of texts
    -> a list of responses, in order."""
    request = build.classify_text(text, text_pair=text_pair, model=model, request_id=request_id, top_k=top_k,
                                  function_to_apply=function_to_apply)
    return request, timeout


def classify_tokens(text: str, *, model: str = "", aggregation_strategy: str | None = None,
                    ignore_labels: Sequence[str] | None = None, stride: int | None = None, request_id: str = "",
                    timeout: float | None = None) -> Call:
    """Text -> entities, like pipeline("token-classification") / pipeline("ner"). A list of
    texts -> a list of responses, in order."""
    request = build.classify_tokens(text, model=model, request_id=request_id,
                                    aggregation_strategy=aggregation_strategy, ignore_labels=ignore_labels,
                                    stride=stride)
    return request, timeout


def answer_question(question: str, context: str, *, model: str = "", top_k: int | None = None,
                    doc_stride: int | None = None, max_answer_len: int | None = None,
                    max_seq_len: int | None = None, max_question_len: int | None = None,
                    handle_impossible_answer: bool | None = None, align_to_words: bool | None = None,
                    request_id: str = "", timeout: float | None = None) -> Call:
    """Question + context -> answer spans, like pipeline("question-answering"). Lists of
    questions and/or contexts (paired in order; a single one goes with each) -> a list of
    responses, in order."""
    options = dict(top_k=top_k, doc_stride=doc_stride, max_answer_len=max_answer_len, max_seq_len=max_seq_len,
                   max_question_len=max_question_len, handle_impossible_answer=handle_impossible_answer,
                   align_to_words=align_to_words)
    request = build.answer_question(question, context, model=model, request_id=request_id, options=options)
    return request, timeout


def fill_mask(text: str, *, model: str = "", top_k: int | None = None, targets: str | Sequence[str] | None = None,
              request_id: str = "", timeout: float | None = None) -> Call:
    """Text with mask token(s) -> candidates per mask, like pipeline("fill-mask"). A list of
    texts -> a list of responses, in order."""
    return build.fill_mask(text, model=model, request_id=request_id, top_k=top_k, targets=targets), timeout


def extract_features(text: str, *, model: str = "", pooling: str | None = None, normalize: bool | None = None,
                     truncate: bool | None = None, request_id: str = "", timeout: float | None = None) -> Call:
    """Text -> embedding(s), like pipeline("feature-extraction"); pooling "mean", "cls",
    "max" or "none" (token embeddings). A list of texts -> a list of responses, in order."""
    request = build.extract_features(text, model=model, request_id=request_id, pooling=pooling,
                                     normalize=normalize, truncate=truncate)
    return request, timeout


# --- the table ----------------------------------------------------------------------------

METHODS: tuple[MethodSpec, ...] = (
    MethodSpec(list_models, "models", "ListModels", unpack=models_of, name="list", group="models"),
    MethodSpec(get_model, "models", "GetModel", unpack=model_of, name="get", group="models"),
    MethodSpec(load_model, "models", "LoadModel", unpack=model_of, name="load", group="models"),
    MethodSpec(unload_model, "models", "UnloadModel", unpack=model_of, name="unload", group="models"),
    MethodSpec(transcribe, "speech", "Transcribe", stream_rpc="TranscribeStream", batch=("audio",)),
    MethodSpec(transcribe_live, "speech", "StreamingTranscribe", kind=Kind.BIDI),
    MethodSpec(generate, "generation", "Generate", stream_rpc="GenerateStream", batch=("prompt",)),
    MethodSpec(classify_image, "image", "ClassifyImage", batch=("image",)),
    MethodSpec(document_qa, "document_qa", "AnswerDocumentQuestion", batch=("image", "question")),
    MethodSpec(zero_shot, "zero_shot", "ClassifyZeroShot", batch=("sequences",)),
    MethodSpec(classify_text, "text", "ClassifyText", batch=("text",)),
    MethodSpec(classify_tokens, "tokens", "ClassifyTokens", batch=("text",)),
    MethodSpec(answer_question, "qa", "AnswerQuestion", batch=("question", "context")),
    MethodSpec(fill_mask, "fill_mask", "FillMask", batch=("text",)),
    MethodSpec(extract_features, "features", "ExtractFeatures", batch=("text",)),
)
