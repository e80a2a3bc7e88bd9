"""The asyncio client: the same methods as Client, as coroutines (unary) and async iterators
(streams), on a grpc.aio channel. Requests are built by the same code as the sync client."""
from __future__ import annotations

import asyncio
from collections import deque
from typing import (Any, AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Literal, Mapping, Sequence,
                    TypeVar, Unpack, overload)

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
from .client import _ClientBase, _Deadline
from .errors import PipeserveError, UnavailableError, from_rpc_error
from .inputs import AudioLike, ImageLike

T = TypeVar("T")
R = TypeVar("R")


class AsyncModels:
    """ModelService: await client.models.list() / get(name) / load(path_or_hub_id, ...) / unload(name)."""

    def __init__(self, client: "AsyncClient") -> None:
        self._client = client

    async def list(self, task: str | None = None, *, timeout: float | None = None) -> list[model_pb2.ModelInfo]:
        return list((await self._client._unary("models", "ListModels", build.list_models(task), timeout)).models)

    async def get(self, model: str, *, timeout: float | None = None) -> model_pb2.ModelInfo:
        return (await self._client._unary("models", "GetModel", model_pb2.GetModelRequest(model=model), timeout)).model

    async def load(self, model: str, *, task: str | None = None, revision: str | None = None,
                   device: str | None = None, dtype: str | None = None, load_in_8bit: bool | None = None,
                   allow_pickle: bool | None = None, set_default: bool | None = None,
                   default_options: Mapping[str, Any] | None = None,
                   timeout: float | None = None) -> model_pb2.ModelInfo:
        request = build.load_model(model, task=task, revision=revision, device=device, dtype=dtype,
                                   load_in_8bit=load_in_8bit, allow_pickle=allow_pickle, set_default=set_default,
                                   default_options=default_options)
        return (await self._client._unary("models", "LoadModel", request, timeout)).model

    async def unload(self, model: str, *, timeout: float | None = None) -> model_pb2.ModelInfo:
        request = model_pb2.UnloadModelRequest(model=model)
        return (await self._client._unary("models", "UnloadModel", request, timeout)).model


class AsyncClient(_ClientBase):
    """A grpc.aio connection to one pipeserve server; arguments as for Client.

        async with AsyncClient("127.0.0.1:50051") as client:
            async for message in await client.generate("Once upon", stream=True):
                ...
    """

    _models = AsyncModels

    def _open_channel(self, options: tuple[tuple[str, Any], ...]) -> grpc.aio.Channel:
        return self.connection.aio_channel(options)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_ready(self, timeout: float = 10.0) -> None:
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except asyncio.TimeoutError:
            raise UnavailableError(f"cannot reach the pipeserve server at {self.target} within {timeout:g}s",
                                   code=grpc.StatusCode.UNAVAILABLE) from None

    # --- call machinery -------------------------------------------------------------------

    async def _unary(self, service: str, method: str, request: Any, timeout: float | None) -> Any:
        call = self._stubs.method(service, method)
        deadline = _Deadline(self._timeout(timeout))
        attempt = 0
        while True:
            attempt += 1
            try:
                return await call(request, timeout=deadline.remaining(), metadata=self._metadata)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, method)
            delay = self._retry_delay(error, attempt, deadline)
            if delay is None:
                raise error
            await asyncio.sleep(delay)
            if not self._still_worth_retrying(deadline):
                raise error

    async def _stream(self, service: str, method: str, request: Any, timeout: float | None) -> AsyncIterator[Any]:
        rpc = self._stubs.method(service, method)
        deadline = _Deadline(self._timeout(timeout))
        attempt = 0
        while True:
            attempt += 1
            received = 0
            call = rpc(request, timeout=deadline.remaining(), metadata=self._metadata)
            try:
                async for message in call:
                    received += 1
                    yield message
                return
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, method, received=received)
            finally:
                call.cancel()
            delay = self._retry_delay(error, attempt, deadline, received)
            if delay is None:
                raise error
            await asyncio.sleep(delay)
            if not self._still_worth_retrying(deadline):
                raise error

    async def _bidi(self, service: str, method: str, requests: Any, timeout: float | None) -> AsyncIterator[Any]:
        call = self._stubs.method(service, method)(requests, timeout=self._timeout(timeout), metadata=self._metadata)
        received = 0
        try:
            async for message in call:
                received += 1
                yield message
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, method, received=received) from None
        finally:
            call.cancel()

    # --- tasks (see Client for the arguments) ---------------------------------------------

    @overload
    async def transcribe(self, audio: AudioLike, *, stream: Literal[False] = False,
                   **options: Unpack[build.TranscribeOptions]) -> asr_pb.TranscribeResponse: ...
    @overload
    async def transcribe(self, audio: AudioLike, *, stream: Literal[True],
                   **options: Unpack[build.TranscribeOptions]) -> AsyncIterator[asr_pb.TranscribeStreamResponse]: ...

    async def transcribe(self, audio: AudioLike, *, stream: bool = False, **options: Unpack[build.TranscribeOptions]
                   ) -> asr_pb.TranscribeResponse | AsyncIterator[asr_pb.TranscribeStreamResponse]:
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
        with the full transcription (await the call for the async iterator)."""
        request, timeout = build.transcribe_call(audio, stream, options)
        if stream:
            return self._stream("speech", "TranscribeStream", request, timeout)
        return await self._unary("speech", "Transcribe", request, timeout)

    def transcribe_live(self, chunks: Iterable[Any], *, sampling_rate: int, channels: int = 1, model: str = "",
                        interim_interval_s: float | None = None, request_id: str = "",
                        timeout: float | None = None,
                        **options: Any) -> AsyncIterator[asr_pb.StreamingTranscribeResponse]:
        requests = build.live_requests(chunks, sampling_rate=sampling_rate, channels=channels, model=model,
                                       request_id=request_id, interim_interval_s=interim_interval_s,
                                       options=options)
        return self._bidi("speech", "StreamingTranscribe", requests, timeout)

    @overload
    async def generate(self, prompt: str, *, stream: Literal[False] = False,
                 **options: Unpack[build.GenerateOptions]) -> gen_pb.GenerateResponse: ...
    @overload
    async def generate(self, prompt: str, *, stream: Literal[True],
                 **options: Unpack[build.GenerateOptions]) -> AsyncIterator[gen_pb.GenerateStreamResponse]: ...

    async def generate(self, prompt: str, *, stream: bool = False, **options: Unpack[build.GenerateOptions]
                 ) -> gen_pb.GenerateResponse | AsyncIterator[gen_pb.GenerateStreamResponse]:
        """Prompt -> continuation, like pipeline("text-generation")(prompt, ...). Options
        (GenerateOptions): model, max_new_tokens, min_new_tokens, do_sample, temperature, top_k,
        top_p, typical_p, repetition_penalty, no_repeat_ngram_size, stop, ignore_eos, seed,
        num_return_sequences, return_full_text, logprobs, return_logprobs, request_id, timeout.
        stream=True yields one GenerateStreamResponse per token (`token`), then `done` per
        sequence (await the call for the async iterator)."""
        request, timeout = build.generate_call(prompt, stream, options)
        if stream:
            return self._stream("generation", "GenerateStream", request, timeout)
        return await self._unary("generation", "Generate", request, timeout)

    async def classify_image(self, image: ImageLike, *, model: str = "", top_k: int | None = None,
                             function_to_apply: str | None = None, request_id: str = "",
                             timeout: float | None = None) -> image_pb.ClassifyImageResponse:
        request = build.classify_image(image, model=model, request_id=request_id, top_k=top_k,
                                       function_to_apply=function_to_apply)
        return await self._unary("image", "ClassifyImage", request, timeout)

    async def document_qa(self, image: ImageLike, question: str, *, word_boxes: Sequence[Any] | None = None,
                          model: str = "", top_k: int | None = None, max_answer_len: int | None = None,
                          doc_stride: int | None = None, max_seq_len: int | None = None,
                          max_question_len: int | None = None, handle_impossible_answer: bool | None = None,
                          lang: str | None = None, request_id: str = "",
                          timeout: float | None = None) -> docqa_pb.AnswerDocumentQuestionResponse:
        options = dict(top_k=top_k, max_answer_len=max_answer_len, doc_stride=doc_stride, max_seq_len=max_seq_len,
                       max_question_len=max_question_len, handle_impossible_answer=handle_impossible_answer,
                       ocr_lang=lang)
        request = build.document_qa(image, question, word_boxes=word_boxes, model=model, request_id=request_id,
                                    options=options)
        return await self._unary("document_qa", "AnswerDocumentQuestion", request, timeout)

    async def zero_shot(self, sequences: str, candidate_labels: Sequence[str] | str, *, model: str = "",
                        hypothesis_template: str | None = None, multi_label: bool | None = None,
                        request_id: str = "", timeout: float | None = None) -> zero_shot_pb.ClassifyZeroShotResponse:
        request = build.zero_shot(sequences, candidate_labels, model=model, request_id=request_id,
                                  hypothesis_template=hypothesis_template, multi_label=multi_label)
        return await self._unary("zero_shot", "ClassifyZeroShot", request, timeout)

    async def classify_text(self, text: str, *, text_pair: str | None = None, model: str = "",
                            top_k: int | None = None, function_to_apply: str | None = None, request_id: str = "",
                            timeout: float | None = None) -> text_pb.ClassifyTextResponse:
        request = build.classify_text(text, text_pair=text_pair, model=model, request_id=request_id, top_k=top_k,
                                      function_to_apply=function_to_apply)
        return await self._unary("text", "ClassifyText", request, timeout)

    async def classify_tokens(self, text: str, *, model: str = "", aggregation_strategy: str | None = None,
                              ignore_labels: Sequence[str] | None = None, stride: int | None = None,
                              request_id: str = "",
                              timeout: float | None = None) -> tokens_pb.ClassifyTokensResponse:
        request = build.classify_tokens(text, model=model, request_id=request_id,
                                        aggregation_strategy=aggregation_strategy, ignore_labels=ignore_labels,
                                        stride=stride)
        return await self._unary("tokens", "ClassifyTokens", request, timeout)

    async def answer_question(self, question: str, context: str, *, model: str = "", top_k: int | None = None,
                              doc_stride: int | None = None, max_answer_len: int | None = None,
                              max_seq_len: int | None = None, max_question_len: int | None = None,
                              handle_impossible_answer: bool | None = None, align_to_words: bool | None = None,
                              request_id: str = "", timeout: float | None = None) -> qa_pb.AnswerQuestionResponse:
        options = dict(top_k=top_k, doc_stride=doc_stride, max_answer_len=max_answer_len, max_seq_len=max_seq_len,
                       max_question_len=max_question_len, handle_impossible_answer=handle_impossible_answer,
                       align_to_words=align_to_words)
        request = build.answer_question(question, context, model=model, request_id=request_id, options=options)
        return await self._unary("qa", "AnswerQuestion", request, timeout)

    async def fill_mask(self, text: str, *, model: str = "", top_k: int | None = None,
                        targets: str | Sequence[str] | None = None, request_id: str = "",
                        timeout: float | None = None) -> fill_mask_pb.FillMaskResponse:
        request = build.fill_mask(text, model=model, request_id=request_id, top_k=top_k, targets=targets)
        return await self._unary("fill_mask", "FillMask", request, timeout)

    async def extract_features(self, text: str, *, model: str = "", pooling: str | None = None,
                               normalize: bool | None = None, truncate: bool | None = None, request_id: str = "",
                               timeout: float | None = None) -> features_pb.ExtractFeaturesResponse:
        request = build.extract_features(text, model=model, request_id=request_id, pooling=pooling,
                                         normalize=normalize, truncate=truncate)
        return await self._unary("features", "ExtractFeatures", request, timeout)

    # --- many inputs ----------------------------------------------------------------------

    async def map(self, fn: Callable[[T], Awaitable[R]], inputs: Iterable[T] | AsyncIterable[T], *,
                  concurrency: int = 8, return_exceptions: bool = False) -> AsyncIterator[R | PipeserveError]:
        """Awaits fn(item) for each input with at most `concurrency` in flight; yields results
        in input order (see Client.map)."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        pending: deque[asyncio.Future] = deque()
        try:
            async for item in _aiter(inputs):
                pending.append(asyncio.ensure_future(fn(item)))
                if len(pending) >= concurrency:
                    yield await _aresult(pending.popleft(), return_exceptions)
            while pending:
                yield await _aresult(pending.popleft(), return_exceptions)
        finally:
            for future in pending:
                future.cancel()


async def _aiter(inputs: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    if hasattr(inputs, "__aiter__"):
        async for item in inputs:  # type: ignore[union-attr]
            yield item
    else:
        for item in inputs:  # type: ignore[union-attr]
            yield item


async def _aresult(future: asyncio.Future, return_exceptions: bool) -> Any:
    try:
        return await future
    except PipeserveError as error:
        if return_exceptions:
            return error
        raise
