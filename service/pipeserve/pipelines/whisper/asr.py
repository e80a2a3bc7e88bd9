"""automatic-speech-recognition with Whisper: transformers' AutomaticSpeechRecognitionPipeline
semantics (pipelines/automatic_speech_recognition.py: preprocess/chunk_iter, _forward,
postprocess -> tokenization_whisper._decode_asr) on our own model, features and decoding.

Two ways through long audio:
- `chunk_length_s` set: the audio is cut into overlapping windows (stride chunk/6 by default),
  `batch_size` windows decode as one batch, and overlaps are stitched (ChunkMerger), exactly as
  the transformers pipeline does with chunk_length_s;
- otherwise (or `long_form_sequential`): Whisper's sequential long-form decoding (the seek
  loop of WhisperGenerationMixin.generate), optionally conditioned on the previous text.
Either way segments are yielded as soon as they close, then the Transcription.

Longer than 450 lines: the chunked and the sequential long-form paths share preprocessing and
segment delivery here; the chunked path's merging moves out with issue 14 item 4.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, ClassVar, Iterator

import torch

from ...checkpoints.hub import ModelFiles
from ...errors import InvalidInput, InvalidParameter, InputTooLarge
from ...inputs.audio import MODEL_SAMPLE_RATE, validate_waveform
from ...layers.passes import VerifiedHeadSite
from ...models import whisper as whisper_family
from ...tasks import Task
from ..asr_types import Segment, Transcription, WordTiming, effective_interim_interval
from ..base import LoadOptions, Pipeline, load_family_model
from .decoding import DecodeOptions, GenerationSettings, generate, text_compression_ratio
from .features import HOP_LENGTH, N_SAMPLES, log_mel_spectrogram
from .tokenizer import LANGUAGES, ChunkMerger, load_tokenizer

_TIMESTAMPS = {None: "segment", "": "segment", "unspecified": "segment", True: "segment", "segment": "segment",
               "true": "segment", False: "none", "none": "none", "false": "none", "word": "word", "char": "char"}
_TASKS = {None: None, "": None, "unspecified": None, "transcribe": "transcribe", "translate": "translate"}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class WhisperASRPipeline(Pipeline):
    task: ClassVar[Task] = Task.AUTOMATIC_SPEECH_RECOGNITION
    # Request option names (TranscriptionOptions) -> defaults. return_timestamps defaults to
    # segments (transformers: off) because this service streams timed segments.
    option_defaults: ClassVar[dict[str, Any]] = {
        "return_timestamps": "segment", "language": None, "task": None, "chunk_length_s": None,
        "stride_length_s": None, "batch_size": 1, "num_beams": 1, "temperature": 0.0,
        "temperature_fallback": None, "compression_ratio_threshold": None, "logprob_threshold": None,
        "no_speech_threshold": None, "initial_prompt": None, "condition_on_previous_text": False,
        "max_new_tokens": None, "long_form_sequential": False, "interim_interval_s": 1.0,
    }
    max_batch_size: int = 64
    max_beams: int = 16
    live_window_s: float = 30.0
    # What this model's last live decode cost (s): a new stream's interim interval starts from
    # it, so the interval reported in its first response is already one the model can afford.
    live_decode_cost_s: float = 0.0

    def __init__(self, files: ModelFiles, options: LoadOptions, model, tok, settings: GenerationSettings):
        super().__init__(files, options, family="whisper",
                         architecture=(files.config.get("architectures") or ["WhisperForConditionalGeneration"])[0])
        self.model, self.tok, self.settings = model, tok, settings
        self.modules_.append(model)
        self.n_mels = model.config.num_mel_bins
        self.max_audio_s = float(options.max_audio_seconds)
        self.validate_options(self.defaults)

    @classmethod
    def from_files(cls, files: ModelFiles, options: LoadOptions) -> "WhisperASRPipeline":
        tok = load_tokenizer(files.path)
        if files.config.get("model_type"):
            settings = GenerationSettings.from_config(files.read_json("generation_config.json"), tok, files.config)
        else:  # CTranslate2 directory: its config.json holds alignment heads and suppressed ids
            settings = GenerationSettings.from_config(None, tok, ct2_config=files.config or {})
        timestamps_from = settings.no_timestamps_token_id + 1

        def verified_head_site(model) -> VerifiedHeadSite:
            # Greedy steps screen the text rows of the tied projection; timestamp rows stay exact.
            return VerifiedHeadSite(model.decoder, "verified_head", model.decoder.embed_tokens.weight, timestamps_from)

        model = load_family_model(files, options, "conditional_generation", family=whisper_family,
                                  verified_head=verified_head_site)
        return cls(files, options, model, tok, settings)

    # -- options ---------------------------------------------------------------------------

    def validate_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Request options -> normalised values; InvalidParameter names the bad field."""
        o = dict(options)

        def bad(name: str, why: str):
            return InvalidParameter(f"{name} {why}, got {o.get(name)!r}", metadata={"field": name})

        level = o.get("return_timestamps")
        key = level.lower().removeprefix("timestamp_granularity_") if isinstance(level, str) else level
        if key not in _TIMESTAMPS:
            raise bad("return_timestamps", "must be none, segment or word")
        o["return_timestamps"] = _TIMESTAMPS[key]
        if o["return_timestamps"] == "char":
            raise bad("return_timestamps", "cannot be char for Whisper (word or segment only)")
        if o["return_timestamps"] == "word" and not self.settings.alignment_heads:
            raise bad("return_timestamps", "cannot be word: this model has no alignment heads")
        task = o.get("task")
        task = task.lower().removeprefix("speech_task_") if isinstance(task, str) else task
        if task not in _TASKS:
            raise bad("task", "must be transcribe or translate")
        o["task"] = _TASKS[task]
        language = o.get("language") or None
        if language is not None:
            code = self.tok.language_code(language)
            if not self.settings.is_multilingual:
                if code != "en":
                    raise bad("language", "must be English (or unset) for an English-only model")
                code = None
            o["language"] = code
        if not self.settings.is_multilingual and o["task"] == "translate":
            raise bad("task", "cannot be translate for an English-only model")
        if not self.settings.is_multilingual:
            o["task"] = None
        chunk = o.get("chunk_length_s")
        if chunk is not None and (not _finite(chunk) or chunk < 0 or chunk > 30):
            raise bad("chunk_length_s", "must be between 0 and 30 seconds")
        stride = o.get("stride_length_s")
        if stride is not None and (not _finite(stride) or stride < 0 or (chunk and 2 * stride >= chunk)):
            raise bad("stride_length_s", "must be non-negative and less than half of chunk_length_s")
        for name, low, high in (("batch_size", 1, self.max_batch_size), ("num_beams", 1, self.max_beams),
                                ("max_new_tokens", 1, self.model.config.max_target_positions)):
            value = o.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise bad(name, f"must be an integer in {low}..{high}")
        temps = [o.get("temperature") or 0.0] + list(o.get("temperature_fallback") or [])
        if any(not _finite(t) or t < 0 or t > 5 for t in temps):
            raise bad("temperature", "and temperature_fallback must be between 0 and 5")
        for name in ("compression_ratio_threshold", "logprob_threshold", "no_speech_threshold"):
            if o.get(name) is not None and not _finite(o[name]):
                raise bad(name, "must be a finite number")
        interval = o.get("interim_interval_s")
        if interval is not None and (not _finite(interval) or interval <= 0):
            raise bad("interim_interval_s", "must be positive")
        return o

    def decode_options(self, o: dict[str, Any], *, timestamps: bool | None = None) -> DecodeOptions:
        prompt = o.get("initial_prompt")
        prompt_ids = self.tok.prompt_ids(prompt) if prompt else None
        if prompt_ids and len(prompt_ids) > self.model.config.max_target_positions // 2 - 1:
            raise InvalidParameter("initial_prompt is too long (at most 223 tokens)", metadata={"field": "initial_prompt"})
        fallback = tuple(o.get("temperature_fallback") or ())
        return DecodeOptions(
            return_timestamps=o["return_timestamps"] != "none" if timestamps is None else timestamps,
            word_timestamps=o["return_timestamps"] == "word", language=o.get("language"), task=o.get("task"),
            num_beams=o.get("num_beams") or 1, temperatures=(float(o.get("temperature") or 0.0),) + fallback,
            compression_ratio_threshold=o.get("compression_ratio_threshold"),
            logprob_threshold=o.get("logprob_threshold"), no_speech_threshold=o.get("no_speech_threshold"),
            prompt_ids=prompt_ids, condition_on_prev_tokens=bool(o.get("condition_on_previous_text")),
            max_new_tokens=o.get("max_new_tokens"))

    # -- calls -----------------------------------------------------------------------------

    def _check(self, waveform: torch.Tensor) -> torch.Tensor:
        if not isinstance(waveform, torch.Tensor) or waveform.dim() != 1:
            raise InvalidInput("audio must be a mono waveform (1-D)", metadata={"field": "audio"})
        validate_waveform(waveform, MODEL_SAMPLE_RATE, max_seconds=self.max_audio_s)
        return waveform.to(torch.float32)

    def transcribe(self, waveforms: list[torch.Tensor], options: dict[str, Any]) -> list[Transcription]:
        """One Transcription per input (each input's chunks are batched)."""
        results = []
        for waveform in waveforms:
            *_, done = self.transcribe_stream(waveform, options)
            results.append(done)
        return results

    def transcribe_stream(self, waveform_16k: torch.Tensor, options: dict[str, Any],
                          should_stop: Callable[[], bool] | None = None) -> Iterator[Segment | Transcription]:
        """Yields final Segments as they are decoded, then the Transcription."""
        o = self.validate_options(self.resolve_options(options))
        waveform = self._check(waveform_16k)
        run = _Run(self, o)
        with torch.inference_mode():
            if o.get("chunk_length_s") and not o.get("long_form_sequential"):
                yield from run.chunked(waveform, should_stop)
            else:
                yield from run.sequential(waveform, should_stop)
        yield run.transcription(waveform.shape[0] / MODEL_SAMPLE_RATE)

    def open_stream(self, options: dict[str, Any]) -> "WhisperLiveStream":
        return WhisperLiveStream(self, self.validate_options(self.resolve_options(options)))


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

    def __init__(self, pipe: WhisperASRPipeline, o: dict[str, Any], *, offset_s: float = 0.0, first_id: int = 0):
        self.pipe, self.o, self.offset_s = pipe, o, offset_s
        self.level = o["return_timestamps"]
        merger_level = {"none": False, "segment": True, "word": "word"}[self.level]
        self.merger = ChunkMerger(pipe.tok, merger_level)
        self.segments: list[Segment] = []
        self.next_id = first_id
        self.language = "en" if not pipe.settings.is_multilingual else (o.get("language") or "")
        self.language_probs: dict[str, float] = {}
        self.stats: dict[str, float] = {}
        self._consumed = 0  # chunks of the replayed merger already turned into segments
        self._last_end_s = offset_s  # where the last final segment ended (or started)
        self.batch_size = 1  # the most windows decoded together

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
        features = log_mel_spectrogram(waveform.to(pipe.device), pipe.n_mels, pad_to=N_SAMPLES if n <= N_SAMPLES else None)
        num_frames = math.ceil(n / HOP_LENGTH) if n <= N_SAMPLES else n // HOP_LENGTH
        opts = pipe.decode_options(self.o)
        tokens: list[int] = []
        times: list[float] = []
        probs: list[float] = []
        for _, segs in generate(pipe.model, features[None], [num_frames], pipe.settings, pipe.tok, opts,
                                should_stop=should_stop, on_language=self._on_language):
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
        chunk_s = float(o["chunk_length_s"])
        stride_s = o.get("stride_length_s")
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
        batch = o.get("batch_size") or 1
        for i in range(0, len(chunks), batch):
            group = chunks[i:i + batch]
            self.batch_size = max(self.batch_size, len(group))
            features = log_mel_spectrogram(torch.stack([torch.nn.functional.pad(c, (0, N_SAMPLES - c.shape[0]))
                                                        for c, _ in group]).to(pipe.device), pipe.n_mels)
            frames = [math.ceil(c.shape[0] / HOP_LENGTH) for c, _ in group]
            rows: list[list] = [[] for _ in group]
            for r, segs in generate(pipe.model, features, frames, pipe.settings, pipe.tok,
                                    DecodeOptions(**vars(opts)), should_stop=should_stop,
                                    on_language=self._on_language if i == 0 else None):
                rows[r].extend(segs)
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

    def __init__(self, pipe: WhisperASRPipeline, o: dict[str, Any]):
        if o["return_timestamps"] == "none":
            o["return_timestamps"] = "segment"  # committing needs segment boundaries
        self.pipe, self.o = pipe, o
        self.requested_interval_s = float(o.get("interim_interval_s") or 1.0)
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

    def push(self, samples_16k: torch.Tensor, should_stop=None) -> list[Segment]:
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
        run = _Run(self.pipe, dict(self.o, chunk_length_s=None, long_form_sequential=False),
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

    def finish(self, should_stop=None) -> tuple[list[Segment], Transcription]:
        self.closed = True
        out: list[Segment] = []
        if self.buffer.shape[0] > 0:
            out = self._decode(self.buffer, commit=True, final=True, should_stop=should_stop)
        self.buffer = torch.zeros(0)
        text = "".join(s.text for s in self.finals)
        return out, Transcription(text=text, segments=list(self.finals), language=self.language or
                                  ("en" if not self.pipe.settings.is_multilingual else ""),
                                  language_probabilities=self.language_probs, duration_s=self.audio_received_s)
