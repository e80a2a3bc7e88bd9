"""automatic-speech-recognition with Whisper: transformers' AutomaticSpeechRecognitionPipeline
semantics (pipelines/automatic_speech_recognition.py: preprocess/chunk_iter, _forward,
postprocess -> tokenization_whisper._decode_asr) on our own model, features and decoding.

Two ways through long audio:
- `chunk_length_s` set: the audio is cut into overlapping windows (stride chunk/6 by default),
  `batch_size` windows decode as one batch, and overlaps are stitched (ChunkMerger), exactly as
  the transformers pipeline does with chunk_length_s;
- otherwise (or `long_form_sequential`): Whisper's sequential long-form decoding (the seek
  loop of WhisperGenerationMixin.generate), optionally conditioned on the previous text.
Either way segments are yielded as soon as they close, then the Transcription. The options
(WhisperOptions) and their checks against the model live in options.py.
"""
from __future__ import annotations

import dataclasses
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Iterator, Mapping

import torch

from ...checkpoints.hub import ModelFiles
from ...errors import InvalidInput, InvalidParameter, InputTooLarge
from ...inputs.audio import MODEL_SAMPLE_RATE, validate_waveform
from ...layers.passes import VerifiedHeadSite
from ...models import whisper as whisper_family
from ...tasks import Task
from ..asr_types import Segment, Transcription, WordTiming, effective_interim_interval
from ..base import LoadOptions, Pipeline, load_family_model
from ..contracts import StopCheck
from ..options import TaskOptions
from . import options as whisper_options
from .batch_scheduler import BatchScheduler
from .decoding import DecodeOptions, GenerationSettings, generate, text_compression_ratio
from .features import HOP_LENGTH, N_SAMPLES, log_mel_spectrogram
from .options import WhisperOptions
from .tokenizer import ChunkMerger, WhisperTokenizer, load_tokenizer


def _tokenizer_and_settings(files: ModelFiles) -> tuple[WhisperTokenizer, GenerationSettings]:
    tok = load_tokenizer(files.path)
    if files.config.get("model_type"):
        return tok, GenerationSettings.from_config(files.read_json("generation_config.json"), tok, files.config)
    # CTranslate2 directory: its config.json holds alignment heads and suppressed ids
    return tok, GenerationSettings.from_config(None, tok, ct2_config=files.config or {})


class WhisperASRPipeline(Pipeline):
    task: ClassVar[Task] = Task.AUTOMATIC_SPEECH_RECOGNITION
    options_type: ClassVar[type[TaskOptions]] = WhisperOptions
    max_batch_size: int = 64
    max_beams: int = 16
    live_window_s: float = 30.0
    # What this model's last live decode cost (s): a new stream's interim interval starts from
    # it, so the interval reported in its first response is already one the model can afford.
    live_decode_cost_s: float = 0.0
    # The model work of concurrent calls is batched by its scheduler (batch_scheduler.py), so
    # a server runs these calls' generators off the compute lane and lets them wait there.
    schedules_compute: ClassVar[bool] = True

    def __init__(self, files: ModelFiles, options: LoadOptions, model, tok, settings: GenerationSettings):
        super().__init__(files, options, family="whisper",
                         architecture=(files.config.get("architectures") or ["WhisperForConditionalGeneration"])[0])
        self.model, self.tok, self.settings = model, tok, settings
        self.modules_.append(model)
        self.n_mels = model.config.num_mel_bins
        self.max_audio_s = float(options.max_audio_seconds)
        self.scheduler = BatchScheduler(model, options.asr_max_batch_rows)
        self.settle_defaults()

    @classmethod
    def from_files(cls, files: ModelFiles, options: LoadOptions) -> "WhisperASRPipeline":
        # The tokenizer (0.15 CPU s, holding the GIL) loads on a second thread while this one
        # reads the weights, whose conversion releases the GIL: a cold start waits for the
        # longer of the two instead of their sum (issue #16).
        with ThreadPoolExecutor(1, thread_name_prefix="pipeserve-tokenizer") as helper:
            text_side = helper.submit(_tokenizer_and_settings, files)

            def verified_head_site(model) -> VerifiedHeadSite:
                # Greedy steps screen the text rows of the tied projection; timestamp rows stay exact.
                timestamps_from = text_side.result()[1].no_timestamps_token_id + 1
                return VerifiedHeadSite(model.decoder, "verified_head", model.decoder.embed_tokens.weight,
                                        timestamps_from)

            model = load_family_model(files, options, "conditional_generation", family=whisper_family,
                                      verified_head=verified_head_site)
            tok, settings = text_side.result()
        return cls(files, options, model, tok, settings)

    # -- options ---------------------------------------------------------------------------

    @property
    def max_target_positions(self) -> int:
        return self.model.config.max_target_positions

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        return whisper_options.check(options, self)

    def decode_options(self, o: WhisperOptions, *, timestamps: bool | None = None) -> DecodeOptions:
        return whisper_options.decode_options(o, self, timestamps=timestamps)

    # -- calls -----------------------------------------------------------------------------

    def _check(self, waveform: torch.Tensor) -> torch.Tensor:
        if not isinstance(waveform, torch.Tensor) or waveform.dim() != 1:
            raise InvalidInput("audio must be a mono waveform (1-D)", metadata={"field": "audio"})
        validate_waveform(waveform, MODEL_SAMPLE_RATE, max_seconds=self.max_audio_s)
        return waveform.to(torch.float32)

    def transcribe(self, waveforms: list[torch.Tensor],
                   options: WhisperOptions | Mapping[str, Any] | None = None) -> list[Transcription]:
        """One Transcription per input (each input's chunks are batched)."""
        results = []
        for waveform in waveforms:
            *_, done = self.transcribe_stream(waveform, options)
            results.append(done)
        return results

    def transcribe_stream(self, waveform_16k: torch.Tensor, options: WhisperOptions | Mapping[str, Any] | None,
                          should_stop: StopCheck | None = None) -> Iterator[Segment | Transcription]:
        """Yields final Segments as they are decoded, then the Transcription."""
        o = self.call_options(options)
        waveform = self._check(waveform_16k)
        run = _Run(self, o)
        with torch.inference_mode():
            if o.chunk_length_s and not o.long_form_sequential:
                yield from run.chunked(waveform, should_stop)
            else:
                yield from run.sequential(waveform, should_stop)
        yield run.transcription(waveform.shape[0] / MODEL_SAMPLE_RATE)

    def open_stream(self, options: WhisperOptions | Mapping[str, Any] | None) -> "WhisperLiveStream":
        return WhisperLiveStream(self, self.call_options(options))

    def close(self) -> None:
        self.scheduler.close()
        super().close()


# The last timestamp token: <|30.00|>, the end of a window.
_LAST_TIMESTAMP = 1500


def _chunk_relative(seg, tb: int) -> list[int]:
    """A decoded segment's tokens with its timestamps counted from the start of its chunk.

    A 30 s chunk can take two decoding passes (the model ends the first before the chunk's end
    and decoding resumes there), whose timestamps each restart at <|0.00|>. transformers'
    _decode_asr resolves the right stride from the raw timestamps, so such a reset made it skip
    every later boundary: segments of 50 s and more, all released at the end of the file.
    Counted from the chunk's start, the timestamps rise through the chunk as in a one-pass
    chunk, which is what the stride logic expects (beyond the window they are capped at
    <|30.00|>; only the right stride, which is cut, reaches there)."""
    shift = round(seg.time_offset / 0.02)
    if not shift:
        return list(seg.tokens)
    return [tb + min(_LAST_TIMESTAMP, t - tb + shift) if t >= tb else t for t in seg.tokens]


class _Run:
    """The state of one transcription: merges decoded windows and turns chunks into Segments."""

    def __init__(self, pipe: WhisperASRPipeline, o: WhisperOptions, *, offset_s: float = 0.0, first_id: int = 0):
        self.pipe, self.o, self.offset_s = pipe, o, offset_s
        self.level = o.return_timestamps
        merger_level = {"none": False, "segment": True, "word": "word"}[self.level]
        self.merger = ChunkMerger(pipe.tok, merger_level)
        self.segments: list[Segment] = []
        self.next_id = first_id
        self.language = "en" if not pipe.settings.is_multilingual else (o.language or "")
        self.language_probs: dict[str, float] = {}
        self.stats: dict[str, float] = {}
        self._consumed = 0  # chunks of the replayed merger already turned into segments
        self._last_end_s = offset_s  # where the last final segment ended (or started)
        self.batch_size = 1  # the most windows decoded together
        self.runner = pipe.scheduler.session()  # where the model work runs (batched with other calls)

    def _on_language(self, found: list[int | None], probs: torch.Tensor | None) -> None:
        if found and found[0] is not None and not self.language:
            self.language = self.pipe.tok.id_to_lang.get(found[0], "")
        if probs is not None:
            codes = list(self.pipe.settings.lang_to_id)
            top = probs[0].topk(min(5, len(codes)))
            self.language_probs = {codes[i]: float(p) for p, i in zip(top.values.tolist(), top.indices.tolist())}

    def _segments(self, chunks: list[dict], final: bool = True) -> list[Segment]:
        out = []
        for chunk in chunks:
            if not chunk["text"].strip() and not chunk.get("words"):
                # _decode_asr closes an empty chunk when a window ends on a timestamp pair
                # ("<|a|><|b|>" then the next window); it carries no text, so it is not a segment.
                continue
            start, end = chunk["timestamp"]
            if start is None and self.level == "none":
                start = 0.0  # without timestamps the text spans the audio (see transcription())
            words = [WordTiming(w["text"], w["timestamp"][0] + self.offset_s, w["timestamp"][1] + self.offset_s,
                                w["probability"])
                     for w in chunk.get("words", [])]
            seg = Segment(id=str(self.next_id), start_s=None if start is None else start + self.offset_s,
                          end_s=None if end is None else end + self.offset_s, text=chunk["text"],
                          tokens=list(chunk["tokens"]), words=words, is_final=final,
                          compression_ratio=text_compression_ratio(chunk["text"]),
                          avg_logprob=self.stats.get("avg_logprob", 0.0),
                          no_speech_prob=self.stats.get("no_speech_prob", 0.0),
                          temperature=self.stats.get("temperature", 0.0), earliest_start_s=self._last_end_s)
            if final:
                # A chunk with text but no start timestamp (a window cut after a closed segment)
                # starts, at the earliest, where the segment before it ended.
                self._last_end_s = next((t for t in (seg.end_s, seg.start_s) if t is not None), self._last_end_s)
                self.next_id += 1
                self.segments.append(seg)
            out.append(seg)
        return out

    def _window_stats(self, segs) -> None:
        if segs:
            self.stats = {"avg_logprob": segs[-1].avg_logprob, "no_speech_prob": segs[-1].no_speech_prob,
                          "temperature": segs[-1].temperature}

    def sequential(self, waveform: torch.Tensor, should_stop) -> Iterator[Segment]:
        pipe = self.pipe
        n = waveform.shape[0]
        # The pipeline pads <= 30 s inputs to one window; longer ones keep their length, and the
        # log-mel clamp then spans the whole input (feature extractor with padding="longest").
        features = self.runner.call(log_mel_spectrogram, waveform.to(pipe.device), pipe.n_mels,
                                    pad_to=N_SAMPLES if n <= N_SAMPLES else None)
        num_frames = math.ceil(n / HOP_LENGTH) if n <= N_SAMPLES else n // HOP_LENGTH
        opts = pipe.decode_options(self.o)
        tokens: list[int] = []
        times: list[float] = []
        probs: list[float] = []
        for _, segs in generate(pipe.model, features[None], [num_frames], pipe.settings, pipe.tok, opts,
                                should_stop=should_stop, on_language=self._on_language, runner=self.runner):
            self.batch_size = max(self.batch_size, self.runner.batch_rows)
            self._window_stats(segs)
            for seg in segs:
                tokens.extend(seg.tokens)
                times.extend(seg.token_times or [])
                probs.extend(seg.token_probs or [])
            # The merger sees the concatenated tokens as one model output, as _decode_asr does;
            # it is re-run on the growing list so chunks close as soon as their end arrives.
            yield from self._feed_prefix(tokens, times, probs)
        yield from self._segments(self.merger.finish())

    def _replay(self, tokens, times, probs=None) -> ChunkMerger:
        merger = ChunkMerger(self.pipe.tok, self.merger.rt)
        self._closed = merger.add(tokens, None, times or None, probs or None)
        return merger

    def _feed_prefix(self, tokens, times, probs=None) -> list[Segment]:
        done = self._consumed
        self.merger = self._replay(tokens, times, probs)
        self._consumed = len(self._closed)
        return self._segments(self._closed[done:])

    def chunked(self, waveform: torch.Tensor, should_stop) -> Iterator[Segment]:
        pipe, o = self.pipe, self.o
        sr = MODEL_SAMPLE_RATE
        chunk_s = float(o.chunk_length_s)
        stride_s = o.stride_length_s
        stride_s = chunk_s / 6 if stride_s is None else float(stride_s)
        chunk_len, stride = int(round(chunk_s * sr)), int(round(stride_s * sr))
        step = chunk_len - 2 * stride
        if step <= 0:
            raise InvalidParameter("chunk_length_s must be more than twice stride_length_s", metadata={"field": "stride_length_s"})
        chunks = []  # automatic_speech_recognition.chunk_iter
        n = waveform.shape[0]
        for begin in range(0, n, step):
            end = begin + chunk_len
            piece = waveform[begin:end]
            left = 0 if begin == 0 else stride
            last = end >= n
            right = 0 if last else stride
            if piece.shape[0] > left:
                chunks.append((piece, (piece.shape[0] / sr, left / sr, right / sr)))
            if last:
                break
        opts = pipe.decode_options(self.o)
        batch = o.batch_size or 1
        for i in range(0, len(chunks), batch):
            group = chunks[i:i + batch]
            self.batch_size = max(self.batch_size, len(group))
            features = self.runner.call(log_mel_spectrogram, torch.stack([
                torch.nn.functional.pad(c, (0, N_SAMPLES - c.shape[0])) for c, _ in group]).to(pipe.device), pipe.n_mels)
            frames = [math.ceil(c.shape[0] / HOP_LENGTH) for c, _ in group]
            rows: list[list] = [[] for _ in group]
            for r, segs in generate(pipe.model, features, frames, pipe.settings, pipe.tok,
                                    DecodeOptions(**vars(opts)), should_stop=should_stop,
                                    on_language=self._on_language if i == 0 else None, runner=self.runner):
                rows[r].extend(segs)
            self.batch_size = max(self.batch_size, self.runner.batch_rows)
            if should_stop is not None and should_stop():
                return
            for (_, stride_info), segs in zip(group, rows):
                self._window_stats(segs)
                tokens = [t for seg in segs for t in _chunk_relative(seg, pipe.tok.timestamp_begin)]
                times = [t for seg in segs for t in (seg.token_times or [])]
                probs = [p for seg in segs for p in (seg.token_probs or [])]
                yield from self._segments(self.merger.add(tokens, stride_info, times or None, probs or None))
        yield from self._segments(self.merger.finish())

    def transcription(self, duration_s: float) -> Transcription:
        segments = self.segments
        for seg in segments:  # without timestamps a segment ends where the audio does
            if seg.end_s is None and self.level == "none":
                seg.end_s = self.offset_s + duration_s
        return Transcription(text="".join(s.text for s in segments), segments=segments, language=self.language,
                             batch_size=self.batch_size,
                             language_probabilities=self.language_probs, duration_s=duration_s)


class WhisperLiveStream:
    """Live transcription for StreamingTranscribe. Audio accumulates in a buffer that starts
    at the last committed time. Every `interim_interval_s` of new audio the buffer (at most
    30 s) is decoded: every segment but the last one is committed once the buffer holds more
    than half a window (final, is_final True, ids never reused), the rest is returned as
    interim segments whose ids are the ones their final versions will carry. The buffer then
    restarts at the end of the last committed segment. finish() decodes what is left as final."""

    def __init__(self, pipe: WhisperASRPipeline, o: WhisperOptions):
        if o.return_timestamps == "none":
            o = dataclasses.replace(o, return_timestamps="segment")  # committing needs segment boundaries
        # Each decode is a sequential run over the buffer.
        self.pipe, self.o = pipe, dataclasses.replace(o, chunk_length_s=None, long_form_sequential=False)
        self.requested_interval_s = float(o.interim_interval_s or 1.0)
        self.clock = time.perf_counter
        self.window = int(pipe.live_window_s * MODEL_SAMPLE_RATE)
        self.buffer = torch.zeros(0)
        self.offset = 0  # absolute sample index of buffer[0]
        self.received = 0
        self.since_decode = 0
        self.finals: list[Segment] = []
        self.last_cost_s = pipe.live_decode_cost_s
        self.language = ""
        self.language_probs: dict[str, float] = {}
        self.closed = False

    @property
    def audio_received_s(self) -> float:
        return self.received / MODEL_SAMPLE_RATE

    @property
    def interim_interval_s(self) -> float:
        """Seconds of audio between interim decodes: the requested interval, or twice what a
        decode costs when that is longer, so that a slow machine keeps up with real time."""
        return effective_interim_interval(self.requested_interval_s, self.last_cost_s)

    def push(self, samples_16k: torch.Tensor, should_stop: StopCheck | None = None) -> list[Segment]:
        if self.closed:
            raise InvalidInput("the stream is already finished")
        samples = torch.as_tensor(samples_16k, dtype=torch.float32).reshape(-1)
        if samples.numel() and not bool(torch.isfinite(samples).all()):
            raise InvalidInput("audio contains NaN or infinite samples", metadata={"field": "audio"})
        if (self.received + samples.numel()) / MODEL_SAMPLE_RATE > self.pipe.max_audio_s:
            raise InputTooLarge(f"stream exceeds {self.pipe.max_audio_s:.0f} s of audio", metadata={"field": "audio"})
        self.buffer = torch.cat([self.buffer, samples])
        self.received += samples.numel()
        self.since_decode += samples.numel()
        out: list[Segment] = []
        while self.buffer.shape[0] > self.window:  # a full window is always decided
            out += self._decode(self.buffer[: self.window], commit=True, should_stop=should_stop)
        if self.since_decode >= round(self.interim_interval_s * MODEL_SAMPLE_RATE) and self.buffer.shape[0] > 0:
            out += self._decode(self.buffer, commit=self.buffer.shape[0] > self.window // 2, should_stop=should_stop)
        return out

    def _decode(self, audio: torch.Tensor, *, commit: bool, final: bool = False, should_stop=None) -> list[Segment]:
        self.since_decode = 0
        started = self.clock()
        run = _Run(self.pipe, self.o,
                   offset_s=self.offset / MODEL_SAMPLE_RATE, first_id=len(self.finals))
        with torch.inference_mode():
            for _ in run.sequential(audio, should_stop):
                pass
        self.last_cost_s = self.pipe.live_decode_cost_s = self.clock() - started
        self.language = self.language or run.language
        self.language_probs = self.language_probs or run.language_probs
        segs = run.segments
        if final:
            keep = len(segs)
        elif commit:
            keep = max(len(segs) - 1, 1 if audio.shape[0] >= self.window else 0)
        else:
            keep = 0
        out = []
        for k, seg in enumerate(segs):
            seg.id = str(len(self.finals) + (k if k < keep else k))
            seg.is_final = k < keep
            out.append(seg)
        committed = segs[:keep]
        self.finals.extend(committed)
        if committed:
            end = committed[-1].end_s if committed[-1].end_s is not None else self.offset / MODEL_SAMPLE_RATE + audio.shape[0] / MODEL_SAMPLE_RATE
            cut = max(0, min(int(round(end * MODEL_SAMPLE_RATE)) - self.offset, audio.shape[0]))
            if cut == 0 and audio.shape[0] >= self.window:
                cut = audio.shape[0]  # nothing decidable in a full window: drop it rather than loop
            self.buffer = self.buffer[cut:]
            self.offset += cut
        elif audio.shape[0] >= self.window:
            self.buffer = self.buffer[audio.shape[0]:]
            self.offset += audio.shape[0]
        return out

    def finish(self, should_stop: StopCheck | None = None) -> tuple[list[Segment], Transcription]:
        self.closed = True
        out: list[Segment] = []
        if self.buffer.shape[0] > 0:
            out = self._decode(self.buffer, commit=True, final=True, should_stop=should_stop)
        self.buffer = torch.zeros(0)
        text = "".join(s.text for s in self.finals)
        return out, Transcription(text=text, segments=list(self.finals), language=self.language or
                                  ("en" if not self.pipe.settings.is_multilingual else ""),
                                  language_probabilities=self.language_probs, duration_s=self.audio_received_s)
