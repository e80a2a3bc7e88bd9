"""SpeechRecognitionService: audio (file bytes, raw PCM or URI) -> an ASR pipeline (Whisper or
CTC, both pipelines.contracts.SpeechRecognitionPipeline: `transcribe_stream(waveform, options,
should_stop)` yielding Segments then a Transcription, and `open_stream(options)`) -> segments.
The request's options are built once into the family's frozen options (`pipeline.options`).

Transcribe and TranscribeStream run the pipeline's segment generator on a worker thread;
StreamingTranscribe feeds live chunks to the pipeline's live stream. Leaving early (client
cancelled, deadline passed) sets a stop flag the decoding loop checks between steps, so work
stops at once and the stream's buffers are dropped. No torch here.

Every request's fields are checked against api/limits.py first; then each call takes one of its
model's admission slots (pipeserve.scheduling.admission: QUEUE_FULL at once when the model's queue is
full) before it decodes audio or opens a live stream, which holds its slot while open.
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import InputTooLarge, InvalidInput
from ..inputs import audio as audio_io
from ..pipelines.asr_types import Transcription
from ..pipelines.contracts import LiveTranscription, SpeechRecognitionPipeline
from ..tasks import Task
from ..v1 import speech_recognition_pb2 as pb, speech_recognition_pb2_grpc as pb_grpc
from . import limits
from .common import App, Timer, enum_option, input_bytes, iterate_in_thread, optional_fields, request_id, run_info

TASK = Task.AUTOMATIC_SPEECH_RECOGNITION
SERVICE_NAME = "pipeserve.v1.SpeechRecognitionService"
_SCALARS = ("language", "chunk_length_s", "stride_length_s", "batch_size", "num_beams", "temperature",
            "compression_ratio_threshold", "logprob_threshold", "no_speech_threshold", "initial_prompt",
            "condition_on_previous_text", "max_new_tokens", "long_form_sequential")
_FORMATS = {1: "float32", 2: "int16"}
# One live audio chunk may hold at most this much audio (a client sends chunks as recorded).
MAX_CHUNK_SECONDS = 30.0
# Live audio at another rate is resampled in blocks of at least this many seconds, so filter
# edges fall rarely inside speech.
_RESAMPLE_BLOCK_S = 0.5


def _option_fields(options: pb.TranscriptionOptions, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    out = optional_fields(options, _SCALARS)
    out["return_timestamps"] = enum_option(options, "return_timestamps", "TIMESTAMP_GRANULARITY_")
    out["task"] = enum_option(options, "task", "SPEECH_TASK_")
    out["temperature_fallback"] = list(options.temperature_fallback) or None
    out.update(extra or {})
    return out


def _segment(seg) -> pb.Segment:
    # v1's start_s is required: a segment whose start the model did not give is sent starting
    # at the earliest time it can (the previous segment's end, or the start of the audio).
    start_s = seg.start_s if seg.start_s is not None else seg.earliest_start_s
    msg = pb.Segment(id=seg.id, start_s=start_s, text=seg.text, tokens=seg.tokens, avg_logprob=seg.avg_logprob,
                     no_speech_prob=seg.no_speech_prob, is_final=seg.is_final,
                     compression_ratio=seg.compression_ratio, temperature=seg.temperature,
                     words=[pb.Word(text=w.text, start_s=w.start_s, end_s=w.end_s, probability=w.probability)
                            for w in seg.words],
                     chars=[pb.CharTiming(text=c.text, start_s=c.start_s, end_s=c.end_s) for c in seg.chars])
    if seg.end_s is not None:
        msg.end_s = seg.end_s
    return msg


def _transcription(t) -> pb.Transcription:
    return pb.Transcription(
        text=t.text, segments=[_segment(s) for s in t.segments], language=t.language, duration_s=t.duration_s,
        language_probabilities=[pb.LanguageProbability(language=k, probability=v)
                                for k, v in sorted(t.language_probabilities.items(), key=lambda kv: -kv[1])])


class SpeechRecognitionServicer(pb_grpc.SpeechRecognitionServiceServicer):
    def __init__(self, app: App):
        self.app = app
        # Calls of pipelines that schedule their own model work (Whisper batches concurrent
        # calls: `schedules_compute`) run their generators here, off the compute lane, where
        # they wait for their batch; one thread per running call, so a burst of transcriptions
        # never takes the manager's workers (loads) or the lane.
        self._drivers = ThreadPoolExecutor(max_workers=app.settings.asr_max_batch_rows + 4,
                                           thread_name_prefix="pipeserve-asr")

    def _off_lane(self, pipeline) -> bool:
        return bool(getattr(pipeline, "schedules_compute", False))

    async def _run(self, pipeline, fn):
        """Blocking pipeline work of a live stream: on the lane, or on a driver thread for a
        pipeline that schedules its own model work."""
        if self._off_lane(pipeline):
            return await asyncio.get_running_loop().run_in_executor(self._drivers, fn)
        return await self.app.manager.run(fn)

    @property
    def max_seconds(self) -> float:
        return float(self.app.settings.max_audio_seconds)

    async def _waveform(self, source: pb.TranscribeRequest):
        """AudioInput -> mono float32 16 kHz waveform, decoded and resampled on a worker.
        Called with the model's admission slot held, so at most running + max_queue calls
        per model ever hold decoded audio."""
        which = source.audio.WhichOneof("source")
        if which is None:
            raise InvalidInput("audio is empty: set audio.data, audio.raw or audio.uri", metadata={"field": "audio"})
        if which == "raw":
            raw = source.audio.raw
            if raw.format not in _FORMATS:
                raise InvalidInput("audio.raw.format must be FLOAT32_LE or INT16_LE", metadata={"field": "audio.raw.format"})
            kwargs = dict(samples=raw.samples, fmt=_FORMATS[raw.format], sample_rate=raw.sample_rate,
                          channels=raw.channels or 1)
        else:
            data = await input_bytes(self.app, data=source.audio.data, uri=source.audio.uri, which="audio",
                                     max_bytes=self.app.settings.max_message_bytes)
            kwargs = dict(data=data)
        return await self.app.manager.run(lambda: audio_io.load_audio_input(max_seconds=self.max_seconds, **kwargs))

    async def _events(self, entry, waveform, options):
        """The pipeline's segments then its Transcription, produced on a worker thread; leaving
        early stops the decoding loop."""
        stop = threading.Event()
        pipeline: SpeechRecognitionPipeline = entry.pipeline
        try:
            off_lane = self._off_lane(pipeline)
            async for item in iterate_in_thread(lambda: pipeline.transcribe_stream(waveform, options, stop.is_set),
                                                self._drivers if off_lane else self.app.manager.executor,
                                                on_lane=not off_lane):
                yield item
        finally:
            stop.set()

    async def Transcribe(self, request, context) -> pb.TranscribeResponse:
        rid = request_id(request)
        limits.check(request)
        fields = _option_fields(request.options)
        async with self.app.manager.use(request.model, TASK) as entry, self.app.admitted(entry) as waited_s:
            options = entry.pipeline.options(fields)
            waveform = await self._waveform(request)
            timer = Timer()
            done = None
            async for item in self._events(entry, waveform, options):
                done = item
            return pb.TranscribeResponse(request_id=rid, transcription=_transcription(done),
                                         run=run_info(entry, queue_ms=waited_s * 1000.0, compute_ms=timer.ms(),
                                                      batch_size=done.batch_size))

    async def TranscribeStream(self, request, context):
        rid = request_id(request)
        limits.check(request)
        fields = _option_fields(request.options)
        async with self.app.manager.use(request.model, TASK) as entry, self.app.admitted(entry) as waited_s:
            options = entry.pipeline.options(fields)
            waveform = await self._waveform(request)
            timer = Timer()
            async for item in self._events(entry, waveform, options):
                if isinstance(item, Transcription):
                    yield pb.TranscribeStreamResponse(request_id=rid, done=pb.TranscriptionDone(
                        transcription=_transcription(item),
                        run=run_info(entry, queue_ms=waited_s * 1000.0, compute_ms=timer.ms(),
                                     batch_size=item.batch_size)))
                else:
                    yield pb.TranscribeStreamResponse(request_id=rid, segment=_segment(item))

    async def StreamingTranscribe(self, request_iterator, context):
        first = None
        async for message in request_iterator:
            first = message
            break
        if first is None:
            raise InvalidInput("the stream ended before its StreamingConfig message")
        if first.WhichOneof("message") != "config":
            raise InvalidInput("the first message of a stream must be its StreamingConfig", metadata={"field": "config"})
        config = first.config
        # Every field is checked before any of them sizes a buffer (a channel count of 2^31-1
        # once made this handler allocate until the process was killed).
        limits.check(config, "config.")
        if config.format not in _FORMATS:
            raise InvalidInput("config.format must be FLOAT32_LE or INT16_LE", metadata={"field": "config.format"})
        fmt, rate, channels = _FORMATS[config.format], config.sample_rate, config.channels or 1
        audio_io.check_rate_channels(rate, channels, field="config")
        rid = config.request_id or request_id(config)
        extra = {"interim_interval_s": config.interim_interval_s} if config.HasField("interim_interval_s") else {}
        fields = _option_fields(config.options, extra)
        frame_bytes = (4 if fmt == "float32" else 2) * channels
        max_chunk = int(MAX_CHUNK_SECONDS * rate) * frame_bytes
        # A live stream holds its model's admission slot while open: its state and its
        # compute are those of a running call.
        async with self.app.manager.use(config.model, TASK) as entry, self.app.admitted(entry):
            pipeline: SpeechRecognitionPipeline = entry.pipeline

            def run(fn):
                return self._run(pipeline, fn)
            options = pipeline.options(fields)
            live = await run(lambda: pipeline.open_stream(options))
            stop = threading.Event()
            timer = Timer()
            report = _IntervalReport(live)
            pending = []  # raw audio not yet resampled (other rates), as [channels, frames] blocks
            try:
                async for message in request_iterator:
                    if message.WhichOneof("message") != "audio":
                        raise InvalidInput("only the first message of a stream may be a StreamingConfig",
                                           metadata={"field": "config"})
                    data = message.audio.samples
                    if len(data) > max_chunk:
                        raise InputTooLarge(f"an audio chunk holds {len(data) / frame_bytes / rate:.1f} s; "
                                            f"the limit is {MAX_CHUNK_SECONDS:g} s per chunk",
                                            metadata={"field": "audio.samples", "limit": f"{MAX_CHUNK_SECONDS:g}"})
                    if not data:
                        continue
                    wave, _ = audio_io.decode_raw_pcm(data, fmt, rate, channels, field="config")
                    pending.append(wave)
                    if rate != audio_io.MODEL_SAMPLE_RATE and sum(w.shape[-1] for w in pending) < _RESAMPLE_BLOCK_S * rate:
                        continue
                    block, pending = pending, []
                    segments = await run(lambda: live.push(audio_io.join_to_model_rate(block, rate), stop.is_set))
                    for seg in segments:
                        yield report(pb.StreamingTranscribeResponse(request_id=rid, segment=_segment(seg),
                                                                    audio_received_s=live.audio_received_s))
                if pending:
                    block, pending = pending, []
                    for seg in await run(lambda: live.push(audio_io.join_to_model_rate(block, rate), stop.is_set)):
                        yield report(pb.StreamingTranscribeResponse(request_id=rid, segment=_segment(seg),
                                                                    audio_received_s=live.audio_received_s))
                segments, transcription = await run(lambda: live.finish(stop.is_set))
                for seg in segments:
                    yield report(pb.StreamingTranscribeResponse(request_id=rid, segment=_segment(seg),
                                                                audio_received_s=live.audio_received_s))
                yield report(pb.StreamingTranscribeResponse(
                    request_id=rid, audio_received_s=live.audio_received_s,
                    done=pb.TranscriptionDone(transcription=_transcription(transcription),
                                              run=run_info(entry, compute_ms=timer.ms()))))
            finally:
                stop.set()
                live = report = None  # the stream's buffers go with it


class _IntervalReport:
    """Sets StreamingTranscribeResponse.interim_interval_s on a stream's first response and
    whenever the live stream's effective interval changes."""

    def __init__(self, live: LiveTranscription) -> None:
        self.live, self.last = live, None

    def __call__(self, response: pb.StreamingTranscribeResponse) -> pb.StreamingTranscribeResponse:
        now = self.live.interim_interval_s
        if now is not None and now != self.last:
            response.interim_interval_s = self.last = now
        return response


def register(server, app: App) -> None:
    pb_grpc.add_SpeechRecognitionServiceServicer_to_server(SpeechRecognitionServicer(app), server)
