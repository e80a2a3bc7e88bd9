"""Domain results of speech recognition, shared by every ASR family and the servicer.

A pipeline's `transcribe_stream(...)` yields `Segment`s as they are decoded (interim ones with
is_final=False may be replaced later by a segment with the same id) and finally returns /
yields a `Transcription`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

# Live streams space their interim decodes by at least this many times a decode's cost (in
# seconds of audio), so that decoding takes at most half of real time on a slow machine.
INTERIM_COST_FACTOR = 2.0


def effective_interim_interval(requested_s: float, decode_cost_s: float) -> float:
    """The interim interval a live stream applies: the requested one, or what the model can
    afford when that is longer (rounded up to 0.1 s, so that it changes in visible steps)."""
    tenths = round(INTERIM_COST_FACTOR * decode_cost_s * 10, 6)  # 2 * 0.4 is 0.8, not 0.9
    return max(requested_s, math.ceil(tenths) / 10)


@dataclass
class WordTiming:
    text: str
    start_s: float
    end_s: float
    probability: float = 0.0


@dataclass
class CharTiming:
    text: str
    start_s: float
    end_s: float


@dataclass
class Segment:
    id: str
    start_s: float | None  # None: the model gave the text no start timestamp (transformers: None)
    end_s: float | None
    text: str
    tokens: list[int] = field(default_factory=list)
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    words: list[WordTiming] = field(default_factory=list)
    chars: list[CharTiming] = field(default_factory=list)
    is_final: bool = True
    compression_ratio: float = 0.0
    temperature: float = 0.0
    # The earliest time a segment with an unknown start can start: the end of the segment before
    # it, or the start of the audio its run covers. The v1 contract's start_s is required.
    earliest_start_s: float = 0.0


@dataclass
class Transcription:
    text: str
    segments: list[Segment] = field(default_factory=list)
    language: str = ""
    language_probabilities: dict[str, float] = field(default_factory=dict)
    duration_s: float = 0.0
    # The most windows (chunks) of this input the model ran together (RunInfo.batch_size).
    batch_size: int = 1
