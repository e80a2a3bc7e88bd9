"""The three request shapes a servicer (or the runtime) calls a pipeline through, as Protocols.

- BatchedPipeline: one-shot tasks run by the dynamic batcher: `run_batch(items, options)` ->
  one result per item, in order, batched results equal to one-at-a-time ones.
- SpeechRecognitionPipeline: `transcribe_stream(waveform, options, should_stop)` yields
  `Segment` events as they are decoded, then one `Transcription`; `open_stream(options)` opens
  a `LiveTranscription` fed with live audio. Every ASR family takes `should_stop` (checked
  between decoding steps), so callers never inspect signatures.
- GenerativePipeline: `start(prompt or chat, options)` -> the request started on the model's
  continuous-batching engine.

Each takes its task's frozen options (pipelines/options.py), built once per request by
`options(overrides)`. The protocols are structural: a pipeline satisfies one by having the
methods (tests/test_pipeline_contracts.py checks every registered pipeline class).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Protocol, runtime_checkable

import torch

from ..inputs.chat import Chat
from ..tasks import Task
from .asr_types import Segment, Transcription
from .options import TaskOptions

# Called between decoding steps; True stops the work (the caller went away).
StopCheck = Callable[[], bool]


@runtime_checkable
class OptionsBuilder(Protocol):
    def options(self, overrides: Mapping[str, Any] | None = None) -> TaskOptions:
        """The model's default options, the request's set fields over them, checked once."""


@runtime_checkable
class BatchedPipeline(OptionsBuilder, Protocol):
    """A one-shot task the dynamic batcher runs (runtime/batching.py)."""

    def run_batch(self, items: list[Any], /, options: TaskOptions) -> list[Any]:
        """One result per item, in order; batched results equal one-at-a-time results. (Each
        task names `items` for what they are: texts, images, queries.)"""


@runtime_checkable
class LiveTranscription(Protocol):
    """A live speech-recognition stream (StreamingTranscribe): audio in, segments out."""

    @property
    def audio_received_s(self) -> float: ...

    @property
    def interim_interval_s(self) -> float: ...

    def push(self, samples_16k: torch.Tensor, should_stop: StopCheck | None = None) -> list[Segment]:
        """Adds live audio; returns the segments it made final or interim."""

    def finish(self, should_stop: StopCheck | None = None) -> tuple[list[Segment], Transcription]:
        """Ends the stream: the last segments and the whole transcription."""


@runtime_checkable
class SpeechRecognitionPipeline(OptionsBuilder, Protocol):
    def transcribe_stream(self, waveform_16k: torch.Tensor, options: TaskOptions,
                          should_stop: StopCheck | None = None) -> Iterator[Segment | Transcription]:
        """Segments as they are decoded, then one Transcription (the last item)."""

    def open_stream(self, options: TaskOptions) -> LiveTranscription:
        """A live stream decoding with these options."""


@runtime_checkable
class GenerativePipeline(OptionsBuilder, Protocol):
    def start(self, prompt: str | Chat, options: TaskOptions) -> Any:
        """Starts generating on the model's engine from a prompt or a chat (inputs/chat.py);
        returns the started request, whose events the servicer streams."""


def contract_for(task: Task) -> type:
    """The Protocol the pipelines of `task` satisfy."""
    return {Task.AUTOMATIC_SPEECH_RECOGNITION: SpeechRecognitionPipeline,
            Task.TEXT_GENERATION: GenerativePipeline}.get(task, BatchedPipeline)
