"""Incremental CTC results: segments cut before word delimiters from a growing frame sequence,
and the live-streaming session behind StreamingTranscribe for CTC models (wav2vec2, HuBERT).

Split from pipelines/ctc/asr.py, which owns preprocessing, chunking and the model calls.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Protocol

import torch

from ...errors import InputTooLarge, InvalidInput
from ..asr_types import CharTiming, Segment, Transcription, WordTiming, effective_interim_interval
from .decoding import CTCStreamDecoder, CTCVocabulary, word_offsets
from .options import CTCOptions



class CTCModel(Protocol):
    """What a live stream and a segmenter use of the CTC pipeline (pipelines/ctc/asr.py, which
    imports this module; a Protocol here keeps the two from importing each other)."""

    vocab: CTCVocabulary
    sampling_rate: int
    align_to: int  # samples per logit frame
    min_samples: int
    max_audio_s: float
    live_decode_cost_s: float

    def _chunking(self, options: CTCOptions, n_samples: int) -> tuple[int, int, int] | None: ...

    def normalize(self, waveform: torch.Tensor) -> torch.Tensor: ...

    def _run_chunks(self, chunks: list[tuple[torch.Tensor, tuple[int, int, int]]]
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]: ...


class CTCLiveStream:
    """Incremental CTC over live audio. Audio is cut into the same strided chunks as offline
    chunking; each complete chunk is decoded once and its centre frames are final, so the
    final segments equal `transcribe_stream` on the whole recording with the same options.
    Between complete chunks, every `interim_interval_s` of new audio the pending tail is
    decoded and returned as one interim segment (is_final False) carrying the id the next
    final segment will have. Only the audio of the current chunk is kept."""

    def __init__(self, pipeline: CTCModel, options: CTCOptions):
        self.pipeline = pipeline
        self.options = options
        self.chunk_len, self.stride_left, self.stride_right = pipeline._chunking(options, 1 << 62)
        self.step = self.chunk_len - self.stride_left - self.stride_right
        self.requested_interval_s = float(options.interim_interval_s)
        self.clock = time.perf_counter
        self.segmenter = Segmenter(pipeline, options.return_timestamps)
        self.buffer = torch.zeros(0)  # audio from `offset` on
        self.offset = 0  # absolute sample index of buffer[0] (the current chunk's start)
        self.received = 0
        self.last_interim = 0
        self.interim_cost = pipeline.live_decode_cost_s  # seconds the last interim decode took
        self.closed = False

    @property
    def audio_received_s(self) -> float:
        return self.received / self.pipeline.sampling_rate

    @property
    def interim_interval_s(self) -> float:
        """Seconds of audio between interim decodes: the requested interval, or twice what one
        costs when that is longer, so that on a slow machine they take at most half of real
        time instead of falling behind."""
        return effective_interim_interval(self.requested_interval_s, self.interim_cost)

    def push(self, samples_16k: torch.Tensor, should_stop: Callable[[], bool] | None = None) -> list[Segment]:
        """Adds audio; returns the final segments completed and at most one interim segment."""
        if self.closed:
            raise InvalidInput("the stream is already finished")
        samples = torch.as_tensor(samples_16k, dtype=torch.float32).reshape(-1)
        if samples.numel() and not bool(torch.isfinite(samples).all()):
            raise InvalidInput("audio contains NaN or infinite samples", metadata={"field": "audio"})
        if (self.received + samples.numel()) / self.pipeline.sampling_rate > self.pipeline.max_audio_s:
            raise InputTooLarge(f"stream exceeds {self.pipeline.max_audio_s:.0f} s of audio",
                                metadata={"field": "audio"})
        self.buffer = torch.cat([self.buffer, samples])
        self.received += samples.numel()
        out: list[Segment] = []
        # A chunk is complete when chunk_len samples exist and more audio follows it (the
        # offline chunk_iter marks a chunk last when it reaches the end of the input).
        while self.buffer.shape[0] > self.chunk_len:
            if should_stop is not None and should_stop():
                return out
            left = 0 if self.offset == 0 else self.stride_left
            self._decode(self.buffer[: self.chunk_len], (self.chunk_len, left, self.stride_right))
            segment = self.segmenter.take(final=False)
            if segment is not None:
                out.append(segment)
            self.buffer = self.buffer[self.step:]
            self.offset += self.step
        if self.received - self.last_interim >= round(self.interim_interval_s * self.pipeline.sampling_rate):
            self.last_interim = self.received
            started = self.clock()
            interim = self._interim()
            self.interim_cost = self.pipeline.live_decode_cost_s = self.clock() - started
            if interim is not None:
                out.append(interim)
        return out

    def finish(self, should_stop: Callable[[], bool] | None = None) -> tuple[list[Segment], Transcription]:
        """Decodes the remaining audio as the last chunk; returns its final segments and the
        full transcription."""
        self.closed = True
        out: list[Segment] = []
        left = 0 if self.offset == 0 else self.stride_left
        if self.buffer.shape[0] > left and self.received >= self.pipeline.min_samples:
            self._decode(self.buffer, (self.buffer.shape[0], left, 0))
        segment = self.segmenter.take(final=True)
        if segment is not None:
            out.append(segment)
        self.buffer = torch.zeros(0)
        text = self.segmenter.decoder.text()
        return out, Transcription(text=text, segments=self.segmenter.segments,
                                  duration_s=self.received / self.pipeline.sampling_rate)

    def _decode(self, chunk: torch.Tensor, stride: tuple[int, int, int]) -> None:
        (ids, lps), = self.pipeline._run_chunks([(self.pipeline.normalize(chunk), stride)])
        self.segmenter.decoder.push(ids.tolist(), lps.tolist())

    def _interim(self) -> Segment | None:
        """The not-yet-final text: stable runs not in a final segment + the tail decoded now."""
        left = 0 if self.offset == 0 else self.stride_left
        if self.buffer.shape[0] <= left or self.buffer.shape[0] < self.pipeline.min_samples:
            return None
        probe = Segmenter(self.pipeline, self.options.return_timestamps)
        main = self.segmenter.decoder
        probe.decoder = main.tail(0)
        base = main.frames - probe.decoder.frames
        (ids, lps), = self.pipeline._run_chunks(
            [(self.pipeline.normalize(self.buffer), (self.buffer.shape[0], left, 0))])
        probe.decoder.push(ids.tolist(), lps.tolist())
        segment = probe.take(final=True)
        if segment is None:
            return None
        return probe.shift(segment, base, str(self.segmenter.next_id))


class Segmenter:
    """Turns a CTCStreamDecoder's stable runs into Segments that end before a word delimiter."""

    def __init__(self, pipeline: CTCModel, level: str):
        self.decoder = CTCStreamDecoder(pipeline.vocab)
        self.seconds = pipeline.align_to / pipeline.sampling_rate
        self.align_to, self.rate = pipeline.align_to, pipeline.sampling_rate
        self.level = level
        self.next_id = 0
        self.segments: list[Segment] = []

    def _time(self, frame: int) -> float:
        return frame * self.align_to / self.rate  # as the reference: offset * align_to / sampling_rate

    def take(self, *, final: bool) -> Segment | None:
        groups = self.decoder.groups
        end = len(groups) if final else len(groups) - 1
        if not final:  # cut before the last word delimiter among the stable runs
            delimiter = self.decoder.vocab.word_delimiter_token
            cut = next((i for i in range(end - 1, 0, -1) if groups[i].token == delimiter), None)
            if cut is None:
                return None
            end = cut
        if end <= 0:
            return None
        chars = self.decoder.chars(0, end)
        blank = not "".join(c.char for c, _, _ in chars).strip()
        # Whitespace-only text waits for the next words; at the end it is kept only where
        # char timestamps must list every char (the reference lists the spaces too).
        if not chars or (blank and (not final or self.level != "char")):
            return None
        frames = sum(g.frames for g in groups[:end])
        logprob = sum(self.decoder.logprob_sum[:end])
        self.decoder.drop(end)  # reported runs are not needed again: memory stays bounded
        segment = self._segment(chars, str(self.next_id), frames, logprob, final=True)
        self.next_id += 1
        self.segments.append(segment)
        return segment

    def _segment(self, chars, segment_id: str, frames: int, logprob: float, final: bool) -> Segment:
        offsets = [c for c, _, _ in chars]
        text = "".join(c.char for c in offsets)
        if self.decoder.vocab.do_lower_case:
            text = text.lower()
        segment = Segment(id=segment_id, start_s=self._time(offsets[0].start_offset),
                          end_s=self._time(offsets[-1].end_offset), text=text,
                          tokens=[i for _, i, _ in chars], avg_logprob=logprob / max(1, frames), is_final=final)
        if self.level == "char":
            segment.chars = [CharTiming(c.char, self._time(c.start_offset), self._time(c.end_offset)) for c in offsets]
        if self.level == "word":
            segment.words = [WordTiming(w.word, self._time(w.start_offset), self._time(w.end_offset),
                                        probability=_mean_probability(chars, w.start_offset, w.end_offset))
                             for w in word_offsets(offsets, self.decoder.vocab.replace_word_delimiter_char)]
        return segment

    def shift(self, segment: Segment, frames: int, segment_id: str) -> Segment:
        """An interim copy of a probe segment, moved by `frames` and given the pending id."""
        dt = self._time(frames)
        segment.id, segment.is_final = segment_id, False
        segment.start_s += dt
        segment.end_s = None if segment.end_s is None else segment.end_s + dt
        for item in [*segment.chars, *segment.words]:
            item.start_s += dt
            item.end_s += dt
        return segment


def _mean_probability(chars, start: int, end: int) -> float:
    """exp of the mean log probability of the frames of the chars in [start, end)."""
    inside = [(c.end_offset - c.start_offset, lp) for c, _, lp in chars if start <= c.start_offset < end]
    frames = sum(f for f, _ in inside)
    return math.exp(sum(lp for _, lp in inside) / frames) if frames else 0.0
