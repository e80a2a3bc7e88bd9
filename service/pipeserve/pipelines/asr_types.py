"""Domain results of speech recognition, shared by every ASR family and the servicer.

A pipeline's `transcribe_stream(...)` yields `Segment`s as they are decoded (interim ones with
is_final=False may be replaced later by a segment with the same id) and finally returns /
yields a `Transcription`.
"""
from __future__ import annotations

from dataclasses import dataclass, field


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
    start_s: float
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


@dataclass
class Transcription:
    text: str
    segments: list[Segment] = field(default_factory=list)
    language: str = ""
    language_probabilities: dict[str, float] = field(default_factory=dict)
    duration_s: float = 0.0
    # The most windows (chunks) of this input the model ran together (RunInfo.batch_size).
    batch_size: int = 1
