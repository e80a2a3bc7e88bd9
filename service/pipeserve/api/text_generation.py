"""TextGenerationService: GenerateRequest (a prompt, or a chat of messages) -> the request's options built once
(`pipeline.options`) -> pipeline.start (pipelines.contracts.GenerativePipeline: the model's
continuous-batching engine) -> GenerateResponse, or one GenerateStreamResponse per token plus one done message per
sequence.

The engine delivers events onto this event loop; leaving the loop early (client cancelled,
deadline passed, error) cancels the request, which frees its cache slots before the next
decoding step. No torch here.
"""
from __future__ import annotations

from ..errors import InvalidParameter
from ..inputs.chat import Chat, ChatMessage, check_messages
from ..pipelines.contracts import GenerativePipeline
from ..scheduling.generation_engine import DoneEvent, TokenEvent
from ..tasks import Task
from ..v1 import text_generation_pb2 as pb, text_generation_pb2_grpc as pb_grpc
from . import limits
from .common import App, optional_fields, request_id, run_info

TASK = Task.TEXT_GENERATION
SERVICE_NAME = "pipeserve.v1.TextGenerationService"

_SCALAR_OPTIONS = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "typical_p",
                   "repetition_penalty", "no_repeat_ngram_size", "ignore_eos", "seed", "num_return_sequences",
                   "return_full_text", "logprobs", "return_logprobs")

FINISH_REASONS = {
    "length": pb.FINISH_REASON_LENGTH,
    "eos_token": pb.FINISH_REASON_EOS_TOKEN,
    "stop_sequence": pb.FINISH_REASON_STOP_SEQUENCE,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}


def _option_fields(request) -> dict:
    """The option fields the request set ({field: value or None})."""
    options = optional_fields(request.options, _SCALAR_OPTIONS)
    options["stop"] = list(request.options.stop) or None
    return options


def _prompt_or_chat(request) -> str | Chat:
    """The request's prompt, or its chat (messages) when it sends one instead."""
    if not request.messages:
        return request.prompt
    if request.prompt:
        raise InvalidParameter("send a prompt or messages, not both", metadata={"field": "messages"})
    chat = [ChatMessage(m.role, m.content) for m in request.messages]
    check_messages(chat)
    return chat


def _token(pipeline, event: TokenEvent, with_logprobs: bool) -> pb.Token:
    token = pb.Token(id=event.token, text=event.text, special=event.special)
    if with_logprobs:
        token.logprob = event.logprob
        token.top_logprobs.extend(pb.TopLogprob(id=i, text=pipeline.token_text(i), logprob=lp) for i, lp in event.top)
    return token


def _run(entry, started, batch_size_floor: int = 1):
    handle = started.handle
    queue_ms = ((handle.started_at or handle.submitted_at) - handle.submitted_at) * 1000.0
    return run_info(entry, queue_ms=queue_ms, compute_ms=handle.compute_s * 1000.0,
                    batch_size=max(handle.max_batch, batch_size_floor))


class TextGenerationServicer(pb_grpc.TextGenerationServiceServicer):
    def __init__(self, app: App):
        self.app = app

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        rid = request_id(request)
        limits.check(request)
        async with self.app.manager.use(request.model, TASK) as entry:
            pipeline: GenerativePipeline = entry.pipeline
            started = pipeline.start(_prompt_or_chat(request), pipeline.options(_option_fields(request)))
            done: list[DoneEvent] = []
            try:
                async for event in started.handle:
                    if isinstance(event, DoneEvent):
                        done.append(event)
            finally:
                started.handle.cancel()
            logprobs = started.params.return_logprobs
            sequences = [pb.GeneratedSequence(
                text=started.full_text(d.text), finish_reason=FINISH_REASONS[d.finish_reason],
                generated_tokens=d.generated_tokens,
                tokens=[_token(pipeline, t, True) for t in d.tokens] if logprobs else [])
                for d in sorted(done, key=lambda d: d.index)]
            return pb.GenerateResponse(request_id=rid, sequences=sequences, prompt_tokens=len(started.prompt_ids),
                                       seed=started.params.seed, run=_run(entry, started))

    async def GenerateStream(self, request: pb.GenerateStreamRequest, context):
        rid = request_id(request)
        limits.check(request)
        async with self.app.manager.use(request.model, TASK) as entry:
            pipeline: GenerativePipeline = entry.pipeline
            started = pipeline.start(_prompt_or_chat(request), pipeline.options(_option_fields(request)))
            logprobs = started.params.return_logprobs
            try:
                async for event in started.handle:
                    if isinstance(event, TokenEvent):
                        yield pb.GenerateStreamResponse(request_id=rid, sequence_index=event.index,
                                                        token=_token(pipeline, event, logprobs))
                    else:
                        yield pb.GenerateStreamResponse(request_id=rid, sequence_index=event.index, done=pb.GenerationDone(
                            finish_reason=FINISH_REASONS[event.finish_reason], prompt_tokens=len(started.prompt_ids),
                            generated_tokens=event.generated_tokens, seed=started.params.seed,
                            text=started.full_text(event.text), run=_run(entry, started)))
            finally:
                started.handle.cancel()  # the client went away or the stream ended: stop the work


def register(server, app: App) -> None:
    pb_grpc.add_TextGenerationServiceServicer_to_server(TextGenerationServicer(app), server)
