"""CTC speech recognition's per-call options: TranscriptionOptions' fields, as Whisper's (the
servicer builds one set of fields for either family). The Whisper-only ones (task, beams,
temperature, prompt, ...) must stay unset or at their no-op value; CTCASRPipeline.check_options
refuses anything else."""
from __future__ import annotations

from dataclasses import dataclass

from ..options import TaskOptions


@dataclass(frozen=True)
class CTCOptions(TaskOptions):
    return_timestamps: str | None = None  # "segment", "word" or "char" once checked
    chunk_length_s: float | None = None  # None: one pass up to max_unchunked_s, then auto chunks
    stride_length_s: float | tuple[float, float] | None = None  # None: chunk_length_s / 6
    batch_size: int = 1
    interim_interval_s: float = 0.5
    # Whisper's options, accepted only unset or at their no-op value.
    language: str | None = None
    task: str | None = None
    num_beams: int | None = None
    temperature: float | None = None
    temperature_fallback: tuple[float, ...] | None = None
    compression_ratio_threshold: float | None = None
    logprob_threshold: float | None = None
    no_speech_threshold: float | None = None
    initial_prompt: str | None = None
    condition_on_previous_text: bool | None = None
    max_new_tokens: int | None = None
    long_form_sequential: bool | None = None
