"""The synchronous client: one method per task, named and parameterised as
transformers.pipeline names them, returning the contract's response messages (typed by the
generated .pyi stubs; `to_dict` turns any of them into plain Python values)."""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence, TypeVar, Unpack, overload

import grpc

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

from . import _requests as build
from ._channel import Connection, RetryPolicy
from ._services import StubCache
from .errors import PipeserveError, UnavailableError, from_rpc_error
from .inputs import AudioLike, ImageLike

T = TypeVar("T")
R = TypeVar("R")


class _Deadline:
    """What is left of a call's overall deadline across its retries (None = no deadline)."""

    def __init__(self, timeout: float | None) -> None:
        self.end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self.end is None else max(0.0, self.end - time.monotonic())

    def allows(self, delay: float, attempt_s: float) -> bool:
        """Whether, after waiting `delay`, at least `attempt_s` of the deadline is left."""
        return self.end is None or time.monotonic() + delay + attempt_s <= self.end


class BidiStream:
    """The responses of a bidirectional call. Unlike a generator, cancel() may be called from
    any thread while another is waiting for the next message (a bridge relaying a live stream
    cancels it when its own peer goes away); that wait then raises PipeserveError (CANCELLED).
    close() is cancel() (the call stops on the server), so it can be used like a generator."""

    def __init__(self, call: Any, method: str) -> None:
        self._call, self._method, self._received = call, method, 0

    def __iter__(self) -> "BidiStream":
        return self

    def __next__(self) -> Any:
        try:
            message = next(self._call)
        except StopIteration:
            raise
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self._method, received=self._received) from None
        self._received += 1
        return message

    def cancel(self) -> None:
        self._call.cancel()  # a no-op once the call has ended

    close = cancel

    def __del__(self) -> None:
        self._call.cancel()  # as the generator's `finally` did: an abandoned stream stops


class _ClientBase:
    """What Client and AsyncClient share: the connection, default deadline, retry policy and
    stubs. A subclass names its channel (sync or asyncio) and its ModelService wrapper."""

    _models: type

    def __init__(self, target: str | None = None, *, timeout: float | None = None, tls: bool | None = None,
                 root_certificates: bytes | str | None = None, client_certificate: bytes | str | None = None,
                 client_key: bytes | str | None = None, server_name: str | None = None, token: str | None = None,
                 retry: RetryPolicy | None = None, max_message_bytes: int | None = None,
                 channel_options: Sequence[tuple[str, Any]] = ()) -> None:
        self.connection = Connection.create(target, tls=tls, root_certificates=root_certificates,
                                            client_certificate=client_certificate, client_key=client_key,
                                            server_name=server_name, token=token,
                                            max_message_bytes=max_message_bytes)
        self.target = self.connection.target
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._channel = self._open_channel(tuple(channel_options))
        self._stubs = StubCache(self._channel)
        self._metadata = self.connection.metadata()
        self.models = self._models(self)

    def _open_channel(self, options: tuple[tuple[str, Any], ...]) -> Any:
        raise NotImplementedError

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _retry_delay(self, error: PipeserveError, attempt: int, deadline: _Deadline, received: int = 0) -> float | None:
        """The wait before the next attempt, or None when the call fails with `error`: not
        retryable, out of attempts, a stream that already delivered messages (never delivered
        twice), or too little time left before the deadline for another attempt."""
        delay = self.retry.backoff_s(attempt - 1, error)
        if received or not self.retry.should_retry(error, attempt) or not deadline.allows(delay, self.retry.min_attempt_s):
            return None
        return delay

    def _still_worth_retrying(self, deadline: _Deadline) -> bool:
        """Checked again after the wait: a sleep can overrun on a busy machine."""
        return deadline.allows(0.0, self.retry.min_attempt_s)


class Models:
    """ModelService: client.models.list() / get(name) / load(path_or_hub_id, ...) / unload(name)."""

    def __init__(self, client: "Client") -> None:
        self._client = client

    def list(self, task: str | None = None, *, timeout: float | None = None) -> list[model_pb2.ModelInfo]:
        return list(self._client._unary("models", "ListModels", build.list_models(task), timeout).models)

    def get(self, model: str, *, timeout: float | None = None) -> model_pb2.ModelInfo:
        return self._client._unary("models", "GetModel", model_pb2.GetModelRequest(model=model), timeout).model

    def load(self, model: str, *, task: str | None = None, revision: str | None = None, device: str | None = None,
             dtype: str | None = None, load_in_8bit: bool | None = None, allow_pickle: bool | None = None,
             set_default: bool | None = None, default_options: Mapping[str, Any] | None = None,
             timeout: float | None = None) -> model_pb2.ModelInfo:
        """Loads a local directory or Hub id; returns once the model is ready. Loading can
        take minutes for large models, so give a generous timeout."""
        request = build.load_model(model, task=task, revision=revision, device=device, dtype=dtype,
                                   load_in_8bit=load_in_8bit, allow_pickle=allow_pickle, set_default=set_default,
                                   default_options=default_options)
        return self._client._unary("models", "LoadModel", request, timeout).model

    def unload(self, model: str, *, timeout: float | None = None) -> model_pb2.ModelInfo:
        return self._client._unary("models", "UnloadModel", model_pb2.UnloadModelRequest(model=model), timeout).model


class Client(_ClientBase):
    """A connection to one pipeserve server.

        with Client("127.0.0.1:50051") as client:
            labels = client.classify_image("cat.jpg", top_k=3).labels

    target: "host:port"; default $PIPESERVE_SERVER or 127.0.0.1:50051.
    timeout: default deadline in seconds for each call (None = no deadline); every method
        also takes its own `timeout=`.
    tls / root_certificates / client_certificate / client_key / server_name: TLS, and mutual
        TLS with a client certificate; certificates as PEM bytes or file paths. Giving any
        certificate turns TLS on; tls=True alone uses the system's root certificates.
    token: a bearer token sent as `authorization: Bearer <token>` on every call.
    retry: the RetryPolicy; RetryPolicy(max_attempts=1) disables retries.
    """

    _models = Models

    def _open_channel(self, options: tuple[tuple[str, Any], ...]) -> grpc.Channel:
        return self.connection.sync_channel(options)

    # --- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Blocks until the channel connects; raises UnavailableError after `timeout` s."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise UnavailableError(f"cannot reach the pipeserve server at {self.target} within {timeout:g}s",
                                   code=grpc.StatusCode.UNAVAILABLE) from None

    # --- call machinery -------------------------------------------------------------------

    def _unary(self, service: str, method: str, request: Any, timeout: float | None) -> Any:
        call = self._stubs.method(service, method)
        deadline = _Deadline(self._timeout(timeout))
        attempt = 0
        while True:
            attempt += 1
            try:
                return call(request, timeout=deadline.remaining(), metadata=self._metadata)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, method)
            delay = self._retry_delay(error, attempt, deadline)
            if delay is None:
                raise error
            time.sleep(delay)
            if not self._still_worth_retrying(deadline):
                raise error

    def _stream(self, service: str, method: str, request: Any, timeout: float | None) -> Iterator[Any]:
        """Server-streaming call. Retried only before its first message (so nothing is ever
        delivered twice); closing the iterator early cancels the call, and the server stops."""
        rpc = self._stubs.method(service, method)
        deadline = _Deadline(self._timeout(timeout))
        attempt = 0
        while True:
            attempt += 1
            received = 0
            call = rpc(request, timeout=deadline.remaining(), metadata=self._metadata)
            try:
                for message in call:
                    received += 1
                    yield message
                return
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, method, received=received)
            finally:
                call.cancel()  # no-op when the stream completed; stops the server's work otherwise
            delay = self._retry_delay(error, attempt, deadline, received)
            if delay is None:
                raise error
            time.sleep(delay)
            if not self._still_worth_retrying(deadline):
                raise error

    def _bidi(self, service: str, method: str, requests: Iterator[Any], timeout: float | None) -> "BidiStream":
        """Bidirectional stream: never retried (the request iterator cannot be replayed)."""
        call = self._stubs.method(service, method)(requests, timeout=self._timeout(timeout), metadata=self._metadata)
        return BidiStream(call, method)

    # --- speech recognition ---------------------------------------------------------------

    @overload
    def transcribe(self, audio: AudioLike, *, stream: Literal[False] = False,
                   **options: Unpack[build.TranscribeOptions]) -> asr_pb.TranscribeResponse: ...
    @overload
    def transcribe(self, audio: AudioLike, *, stream: Literal[True],
                   **options: Unpack[build.TranscribeOptions]) -> Iterator[asr_pb.TranscribeStreamResponse]: ...

    def transcribe(self, audio: AudioLike, *, stream: bool = False, **options: Unpack[build.TranscribeOptions]
                   ) -> asr_pb.TranscribeResponse | Iterator[asr_pb.TranscribeStreamResponse]:
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
        with the full transcription."""
        request, timeout = build.transcribe_call(audio, stream, options)
        if stream:
            return self._stream("speech", "TranscribeStream", request, timeout)
        return self._unary("speech", "Transcribe", request, timeout)

    def transcribe_live(self, chunks: Iterable[Any], *, sampling_rate: int, channels: int = 1, model: str = "",
                        interim_interval_s: float | None = None, request_id: str = "",
                        timeout: float | None = None,
                        **options: Any) -> BidiStream:
        """Live audio: `chunks` yields numpy arrays (float32 or int16) or float32 PCM bytes as
        they are captured; yields interim and final segments, then `done` after the last chunk.
        Options are those of transcribe(). The returned stream's cancel() ends the call from
        any thread."""
        requests = build.live_requests(chunks, sampling_rate=sampling_rate, channels=channels, model=model,
                                       request_id=request_id, interim_interval_s=interim_interval_s,
                                       options=options)
        return self._bidi("speech", "StreamingTranscribe", requests, timeout)

    # --- text generation ------------------------------------------------------------------

    @overload
    def generate(self, prompt: str, *, stream: Literal[False] = False,
                 **options: Unpack[build.GenerateOptions]) -> gen_pb.GenerateResponse: ...
    @overload
    def generate(self, prompt: str, *, stream: Literal[True],
                 **options: Unpack[build.GenerateOptions]) -> Iterator[gen_pb.GenerateStreamResponse]: ...

    def generate(self, prompt: str, *, stream: bool = False, **options: Unpack[build.GenerateOptions]
                 ) -> gen_pb.GenerateResponse | Iterator[gen_pb.GenerateStreamResponse]:
        """Prompt -> continuation, like pipeline("text-generation")(prompt, ...). Options
        (GenerateOptions): model, max_new_tokens, min_new_tokens, do_sample, temperature, top_k,
        top_p, typical_p, repetition_penalty, no_repeat_ngram_size, stop, ignore_eos, seed,
        num_return_sequences, return_full_text, logprobs, return_logprobs, request_id, timeout.
        stream=True yields one GenerateStreamResponse per token (`token`), then `done` per
        sequence."""
        request, timeout = build.generate_call(prompt, stream, options)
        if stream:
            return self._stream("generation", "GenerateStream", request, timeout)
        return self._unary("generation", "Generate", request, timeout)

    def classify_image(self, image: ImageLike, *, model: str = "", top_k: int | None = None,
                       function_to_apply: str | None = None, request_id: str = "",
                       timeout: float | None = None) -> image_pb.ClassifyImageResponse:
        """Image (path, bytes, URI, PIL image) -> labels, like pipeline("image-classification")."""
        request = build.classify_image(image, model=model, request_id=request_id, top_k=top_k,
                                       function_to_apply=function_to_apply)
        return self._unary("image", "ClassifyImage", request, timeout)

    def document_qa(self, image: ImageLike, question: str, *, word_boxes: Sequence[Any] | None = None,
                    model: str = "", top_k: int | None = None, max_answer_len: int | None = None,
                    doc_stride: int | None = None, max_seq_len: int | None = None,
                    max_question_len: int | None = None, handle_impossible_answer: bool | None = None,
                    lang: str | None = None, request_id: str = "",
                    timeout: float | None = None) -> docqa_pb.AnswerDocumentQuestionResponse:
        """Document image + question -> answers, like pipeline("document-question-answering").
        word_boxes=[(word, (x0, y0, x1, y1)), ...] (0..1000) skips the server's OCR."""
        options = dict(top_k=top_k, max_answer_len=max_answer_len, doc_stride=doc_stride, max_seq_len=max_seq_len,
                       max_question_len=max_question_len, handle_impossible_answer=handle_impossible_answer,
                       ocr_lang=lang)
        request = build.document_qa(image, question, word_boxes=word_boxes, model=model, request_id=request_id,
                                    options=options)
        return self._unary("document_qa", "AnswerDocumentQuestion", request, timeout)

    # --- text -----------------------------------------------------------------------------

    def zero_shot(self, sequences: str, candidate_labels: Sequence[str] | str, *, model: str = "",
                  hypothesis_template: str | None = None, multi_label: bool | None = None, request_id: str = "",
                  timeout: float | None = None) -> zero_shot_pb.ClassifyZeroShotResponse:
        """Text + labels of your choosing -> scores, like pipeline("zero-shot-classification")."""
        request = build.zero_shot(sequences, candidate_labels, model=model, request_id=request_id,
                                  hypothesis_template=hypothesis_template, multi_label=multi_label)
        return self._unary("zero_shot", "ClassifyZeroShot", request, timeout)

    def classify_text(self, text: str, *, text_pair: str | None = None, model: str = "", top_k: int | None = None,
                      function_to_apply: str | None = None, request_id: str = "",
                      timeout: float | None = None) -> text_pb.ClassifyTextResponse:
        """Text (or a pair) -> labels, like pipeline("text-classification")."""
        request = build.classify_text(text, text_pair=text_pair, model=model, request_id=request_id, top_k=top_k,
                                      function_to_apply=function_to_apply)
        return self._unary("text", "ClassifyText", request, timeout)

    def classify_tokens(self, text: str, *, model: str = "", aggregation_strategy: str | None = None,
                        ignore_labels: Sequence[str] | None = None, stride: int | None = None,
                        request_id: str = "", timeout: float | None = None) -> tokens_pb.ClassifyTokensResponse:
        """Text -> entities, like pipeline("token-classification") / pipeline("ner")."""
        request = build.classify_tokens(text, model=model, request_id=request_id,
                                        aggregation_strategy=aggregation_strategy, ignore_labels=ignore_labels,
                                        stride=stride)
        return self._unary("tokens", "ClassifyTokens", request, timeout)

    def answer_question(self, question: str, context: str, *, model: str = "", top_k: int | None = None,
                        doc_stride: int | None = None, max_answer_len: int | None = None,
                        max_seq_len: int | None = None, max_question_len: int | None = None,
                        handle_impossible_answer: bool | None = None, align_to_words: bool | None = None,
                        request_id: str = "", timeout: float | None = None) -> qa_pb.AnswerQuestionResponse:
        """Question + context -> answer spans, like pipeline("question-answering")."""
        options = dict(top_k=top_k, doc_stride=doc_stride, max_answer_len=max_answer_len, max_seq_len=max_seq_len,
                       max_question_len=max_question_len, handle_impossible_answer=handle_impossible_answer,
                       align_to_words=align_to_words)
        request = build.answer_question(question, context, model=model, request_id=request_id, options=options)
        return self._unary("qa", "AnswerQuestion", request, timeout)

    def fill_mask(self, text: str, *, model: str = "", top_k: int | None = None,
                  targets: str | Sequence[str] | None = None, request_id: str = "",
                  timeout: float | None = None) -> fill_mask_pb.FillMaskResponse:
        """Text with mask token(s) -> candidates per mask, like pipeline("fill-mask")."""
        request = build.fill_mask(text, model=model, request_id=request_id, top_k=top_k, targets=targets)
        return self._unary("fill_mask", "FillMask", request, timeout)

    def extract_features(self, text: str, *, model: str = "", pooling: str | None = None,
                         normalize: bool | None = None, truncate: bool | None = None, request_id: str = "",
                         timeout: float | None = None) -> features_pb.ExtractFeaturesResponse:
        """Text -> embedding(s), like pipeline("feature-extraction"); pooling "mean", "cls",
        "max" or "none" (token embeddings)."""
        request = build.extract_features(text, model=model, request_id=request_id, pooling=pooling,
                                         normalize=normalize, truncate=truncate)
        return self._unary("features", "ExtractFeatures", request, timeout)

    # --- many inputs ----------------------------------------------------------------------

    def map(self, fn: Callable[[T], R], inputs: Iterable[T], *, concurrency: int = 8,
            return_exceptions: bool = False) -> Iterator[R | PipeserveError]:
        """Runs fn(item) for each input with at most `concurrency` calls in flight and yields
        the results in input order, as transformers' pipeline does over a dataset. The
        iterable is consumed lazily, so it may be a generator over a large dataset.

            for result in client.map(lambda p: client.classify_image(p, top_k=1), paths):
                ...

        A failed item raises its PipeserveError (after retries) when its turn comes, and the
        calls still in flight are cancelled; with return_exceptions=True the error is yielded
        in its place and iteration goes on."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        pending: deque[Future] = deque()
        items = iter(inputs)
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="pipeserve-map") as pool:
            try:
                for item in items:
                    pending.append(pool.submit(fn, item))
                    if len(pending) >= concurrency:
                        yield _result(pending.popleft(), return_exceptions)
                while pending:
                    yield _result(pending.popleft(), return_exceptions)
            finally:
                for future in pending:
                    future.cancel()


def _result(future: Future, return_exceptions: bool) -> Any:
    try:
        return future.result()
    except PipeserveError as error:
        if return_exceptions:
            return error
        raise
