"""The endpoints: each parses OpenAI's request, builds the pipeserve.v1 request, calls the
service over the loopback channel with the caller's bearer token, and answers in OpenAI's
shape (JSON, or server-sent events when `stream` is true)."""
from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid

import grpc
from aiohttp import web

from ..config import Settings
from . import chat, fields, sse, transcripts
from .errors import HttpError, error_response, from_rpc_error, invalid, sse_error

# OpenAI's own bound on one embeddings request's inputs; each is one ExtractFeatures call.
MAX_EMBEDDING_INPUTS = 2048
# Calls one embeddings request keeps in flight (the server batches concurrent calls).
EMBEDDING_CONCURRENCY = 8
FINISH = {1: "length", 2: "stop", 3: "stop", 4: "stop"}  # pipeserve.v1.FinishReason -> OpenAI


class Routes:
    def __init__(self, channel: grpc.aio.Channel, settings: Settings) -> None:
        from pipeserve.v1 import (feature_extraction_pb2_grpc, model_pb2_grpc, speech_recognition_pb2_grpc,
                                  text_generation_pb2_grpc)
        from grpc_health.v1 import health_pb2_grpc

        self.settings = settings
        self.speech = speech_recognition_pb2_grpc.SpeechRecognitionServiceStub(channel)
        self.features = feature_extraction_pb2_grpc.FeatureExtractionServiceStub(channel)
        self.generation = text_generation_pb2_grpc.TextGenerationServiceStub(channel)
        self.models = model_pb2_grpc.ModelServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)

    def install(self, app: web.Application) -> None:
        app.router.add_post("/v1/audio/transcriptions", self.transcriptions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)

    # ---- plumbing ---------------------------------------------------------------------------
    @web.middleware
    async def errors(self, request: web.Request, handler):
        """Every failure in OpenAI's error shape: the front door's own refusals, gRPC statuses,
        and aiohttp's (unknown route, wrong method, a body over max_message_bytes)."""
        limit = self.settings.max_message_bytes
        if request.content_length is not None and request.content_length > limit:
            # Refused before a byte of the body is read.
            return error_response(413, f"request body of {request.content_length} bytes exceeds the "
                                       f"server's limit of {limit} bytes", "INPUT_TOO_LARGE")
        try:
            return await handler(request)
        except HttpError as exc:
            return error_response(exc.status, exc.message, exc.reason, exc.param)
        except grpc.aio.AioRpcError as exc:
            return from_rpc_error(exc)
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"request body exceeds the server's limit of {limit} bytes",
                                  "INPUT_TOO_LARGE")
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(exc.status, exc.reason, "NOT_FOUND" if exc.status == 404 else "INVALID_INPUT")

    @staticmethod
    def _metadata(request: web.Request) -> tuple[tuple[str, str], ...]:
        """The caller's credentials and trace context, passed on as gRPC metadata."""
        pairs = []
        for header in ("authorization", "traceparent"):
            value = request.headers.get(header)
            if value:
                pairs.append((header, value))
        return tuple(pairs)

    @staticmethod
    async def _json(request: web.Request) -> dict:
        try:
            body = await request.json(loads=json.loads)
        except web.HTTPException:
            raise
        except ValueError:
            raise invalid("the request body is not valid JSON", reason="MALFORMED_REQUEST") from None
        if not isinstance(body, dict):
            raise invalid("the request body must be a JSON object", reason="MALFORMED_REQUEST")
        return body

    async def _sse_response(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        return response

    # ---- health -----------------------------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        """Liveness: the process answers (no auth, as gRPC health)."""
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Readiness: the gRPC server's overall health is SERVING (not starting, not draining)."""
        from grpc_health.v1 import health_pb2

        try:
            answer = await self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            ready = answer.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            ready = False
        return web.json_response({"status": "ready" if ready else "not ready"}, status=200 if ready else 503)

    # ---- models -----------------------------------------------------------------------------
    async def list_models(self, request: web.Request) -> web.Response:
        from pipeserve.v1 import model_pb2

        answer = await self.models.ListModels(model_pb2.ListModelsRequest(), metadata=self._metadata(request))
        return web.json_response({"object": "list", "data": [{
            "id": m.name, "object": "model", "created": m.loaded_at.seconds, "owned_by": "pipeserve",
            "task": model_pb2.Task.Name(m.task).removeprefix("TASK_").lower(), "default": m.is_default,
        } for m in answer.models]})

    # ---- speech -----------------------------------------------------------------------------
    async def transcriptions(self, request: web.Request) -> web.StreamResponse:
        from pipeserve.v1 import common_pb2, speech_recognition_pb2 as pb

        if request.content_type != "multipart/form-data":
            raise invalid("send the audio as multipart/form-data with a 'file' field", "file",
                          reason="UNSUPPORTED_FORMAT")
        form = await request.post()  # bounded by client_max_size
        upload = form.get("file")
        if not isinstance(upload, web.FileField):
            raise invalid("the 'file' field (the audio file) is missing", "file", reason="EMPTY_INPUT")
        values = {key: value for key, value in form.items() if isinstance(value, str)}
        response_format = values.get("response_format", "json")
        if response_format not in transcripts.FORMATS:
            raise invalid(f"response_format must be one of {', '.join(transcripts.FORMATS)}", "response_format")
        granularities = set(form.getall("timestamp_granularities[]", [])) | set(form.getall("timestamp_granularities", []))
        if granularities - {"segment", "word"}:
            raise invalid("timestamp_granularities[] holds 'segment' and/or 'word'", "timestamp_granularities[]")
        if granularities and response_format != "verbose_json":
            raise invalid("timestamp_granularities[] needs response_format verbose_json", "timestamp_granularities[]")
        stream = fields.boolean(values.get("stream", "false"), "stream")
        options = pb.TranscriptionOptions()
        if values.get("language"):
            options.language = values["language"]
        if values.get("prompt"):
            options.initial_prompt = values["prompt"]
        temperature = fields.number(values, "temperature", float, 0.0, 1.0)
        if temperature is not None:
            options.temperature = temperature
        words = "word" in granularities
        if words:
            options.return_timestamps = pb.TIMESTAMP_GRANULARITY_WORD
        elif response_format in ("srt", "vtt", "verbose_json"):
            options.return_timestamps = pb.TIMESTAMP_GRANULARITY_SEGMENT
        audio = common_pb2.AudioInput(data=upload.file.read())
        model = values.get("model", "")
        metadata = self._metadata(request)
        if stream:
            return await self._stream_transcription(request, pb.TranscribeStreamRequest(
                model=model, audio=audio, options=options), metadata)
        answer = await self.speech.Transcribe(pb.TranscribeRequest(model=model, audio=audio, options=options),
                                              metadata=metadata)
        result = answer.transcription
        if response_format == "text":
            return web.Response(text=result.text + "\n", content_type="text/plain")
        if response_format == "srt":
            return web.Response(text=transcripts.srt(result), content_type="text/plain")
        if response_format == "vtt":
            return web.Response(text=transcripts.vtt(result), content_type="text/vtt")
        if response_format == "verbose_json":
            return web.json_response(transcripts.verbose_json(
                result, words=words, segments="segment" in granularities or not words, task="transcribe"))
        return web.json_response({"text": result.text})

    async def _stream_transcription(self, request, message, metadata) -> web.StreamResponse:
        """OpenAI's transcription events: transcript.text.delta per final segment, then
        transcript.text.done with the whole text."""
        call = self.speech.TranscribeStream(message, metadata=metadata)
        first = await sse.first(call)  # a refusal (bad audio, unknown model) still gets its HTTP status
        response = await self._sse_response(request)
        try:
            async for event in sse.chain(first, call):
                if event.HasField("segment") and event.segment.is_final and event.segment.text:
                    await response.write(sse.event({"type": "transcript.text.delta", "delta": event.segment.text}))
                elif event.HasField("done"):
                    await response.write(sse.event({"type": "transcript.text.done",
                                               "text": event.done.transcription.text}))
        except grpc.aio.AioRpcError as exc:
            await response.write(sse.event(sse_error(exc)))
        finally:
            call.cancel()  # no-op once it ended; stops the work when the client went away
        await response.write_eof()
        return response

    # ---- embeddings -------------------------------------------------------------------------
    async def embeddings(self, request: web.Request) -> web.Response:
        from pipeserve.v1 import feature_extraction_pb2 as pb

        body = await self._json(request)
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            raise invalid("input must be a string or a non-empty list of strings", "input", reason="EMPTY_INPUT")
        if len(inputs) > MAX_EMBEDDING_INPUTS:
            raise invalid(f"input holds {len(inputs)} items; at most {MAX_EMBEDDING_INPUTS}", "input",
                          reason="INPUT_TOO_LARGE")
        if not all(isinstance(text, str) for text in inputs):
            raise invalid("input must hold strings (token arrays are not supported)", "input",
                          reason="UNSUPPORTED_FORMAT")
        encoding = fields.string(body, "encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise invalid("encoding_format must be float or base64", "encoding_format")
        if body.get("dimensions") is not None:
            raise invalid("dimensions is not supported: the model's embedding size is returned", "dimensions")
        model = fields.string(body, "model")
        metadata = self._metadata(request)
        gate = asyncio.Semaphore(EMBEDDING_CONCURRENCY)

        async def one(text: str):
            async with gate:
                request = pb.ExtractFeaturesRequest(model=model, text=text)
                answer = await self.features.ExtractFeatures(request, metadata=metadata)
                if not answer.sentence_embedding.values:
                    # No sentence-transformers pooling config: the model's own answer is per
                    # token, and an embedding is one vector: mean pooling, as sentence-transformers
                    # does for a plain transformer. (A model with a config keeps its own pooling.)
                    request.pooling = pb.POOLING_MEAN
                    answer = await self.features.ExtractFeatures(request, metadata=metadata)
                return answer

        tasks = [asyncio.ensure_future(one(text)) for text in inputs]
        try:
            answers = await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # the first failure cancels the calls still running
                task.cancel()
        data, tokens = [], 0
        for index, answer in enumerate(answers):
            values = list(answer.sentence_embedding.values)
            if not values:
                raise invalid(f"model {model or '(default)'} returns no pooled embedding", "model")
            tokens += answer.tokens
            embedding = (base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
                         if encoding == "base64" else values)
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        name = answers[0].run.model or model
        return web.json_response({"object": "list", "data": data, "model": name,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    # ---- text generation --------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise invalid("prompt must be a string (or a list of one string)", "prompt")
        return await self._generate(request, body, prompt=prompt)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        return await self._generate(request, body, messages=chat.chat_messages(body.get("messages")))

    async def _generate(self, request, body: dict, *, prompt: str = "", messages: list | None = None
                        ) -> web.StreamResponse:
        """A completion (prompt) or a chat completion (messages, rendered by the server's chat template)."""
        from pipeserve.v1 import text_generation_pb2 as pb

        chat_api = messages is not None

        options = fields.generation_options(body, chat_api=chat_api)
        stream = fields.boolean(body.get("stream", False), "stream")
        model = fields.string(body, "model")
        metadata = self._metadata(request)
        ident = ("chatcmpl-" if chat_api else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if stream:
            return await self._stream_generation(request, pb.GenerateStreamRequest(
                model=model, prompt=prompt, messages=messages, options=options), metadata, ident, created, chat_api,
                include_usage=bool((body.get("stream_options") or {}).get("include_usage")))
        answer = await self.generation.Generate(pb.GenerateRequest(model=model, prompt=prompt, messages=messages,
                                                                   options=options), metadata=metadata)
        completion_tokens = sum(s.generated_tokens for s in answer.sequences)
        choices = []
        for index, sequence in enumerate(answer.sequences):
            finish = FINISH.get(sequence.finish_reason, "stop")
            choices.append({"index": index, "message": {"role": "assistant", "content": sequence.text},
                            "finish_reason": finish, "logprobs": None} if chat_api else
                           {"index": index, "text": sequence.text, "finish_reason": finish, "logprobs": None})
        return web.json_response({
            "id": ident, "object": "chat.completion" if chat_api else "text_completion", "created": created,
            "model": answer.run.model or model, "choices": choices,
            "usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": answer.prompt_tokens + completion_tokens}})

    async def _stream_generation(self, request, message, metadata, ident, created, chat_api,
                                 include_usage: bool) -> web.StreamResponse:
        """OpenAI's chunks: `data: {...}` per token (chat: a first delta with the role), a
        last chunk per choice with its finish_reason, then `data: [DONE]`."""
        call = self.generation.GenerateStream(message, metadata=metadata)
        first = await sse.first(call)  # a refusal still gets its HTTP status
        response = await self._sse_response(request)
        kind = "chat.completion.chunk" if chat_api else "text_completion"
        model = message.model
        prompt_tokens = completion_tokens = 0

        def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> dict:
            if chat_api:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
                choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
            return {"id": ident, "object": kind, "created": created, "model": model, "choices": [choice]}

        started: set[int] = set()
        try:
            async for event in sse.chain(first, call):
                index = event.sequence_index
                if chat_api and index not in started:
                    started.add(index)
                    await response.write(sse.event(chunk(index, None, None, role=True)))
                if event.HasField("token"):
                    if not event.token.special and event.token.text:
                        await response.write(sse.event(chunk(index, event.token.text, None)))
                elif event.HasField("done"):
                    model = event.done.run.model or model
                    prompt_tokens = event.done.prompt_tokens
                    completion_tokens += event.done.generated_tokens
                    await response.write(sse.event(chunk(index, None if chat_api else "",
                                                    FINISH.get(event.done.finish_reason, "stop"))))
            if include_usage:
                await response.write(sse.event({"id": ident, "object": kind, "created": created, "model": model,
                                           "choices": [], "usage": {
                                               "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                               "total_tokens": prompt_tokens + completion_tokens}}))
            await response.write(sse.event("[DONE]"))
        except grpc.aio.AioRpcError as exc:
            await response.write(sse.event(sse_error(exc)))
        finally:
            call.cancel()
        await response.write_eof()
        return response
