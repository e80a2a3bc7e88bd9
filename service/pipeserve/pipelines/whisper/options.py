"""Whisper's per-call options (TranscriptionOptions' fields), their checks against the loaded
model (alignment heads for word timestamps, English-only models, beam and batch limits,
prompt length), and their conversion to the decoder's DecodeOptions.

WhisperASRPipeline.options(overrides) runs `check` once per request; the frozen result goes
to the pipeline's calls, which convert it with `decode_options` for each decoding run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from ...errors import InvalidParameter
from ..options import TaskOptions
from .decoding import DecodeOptions, GenerationSettings

_TIMESTAMPS = {None: "segment", "": "segment", "unspecified": "segment", True: "segment", "segment": "segment",
               "true": "segment", False: "none", "none": "none", "false": "none", "word": "word", "char": "char"}
_TASKS = {None: None, "": None, "unspecified": None, "transcribe": "transcribe", "translate": "translate"}


@dataclass(frozen=True)
class WhisperOptions(TaskOptions):
    # return_timestamps defaults to segments (transformers: off) because this service streams
    # timed segments; "none", "segment" or "word" once checked.
    return_timestamps: str = "segment"
    language: str | None = None  # a language code once checked; None: detected
    task: str | None = None  # "transcribe", "translate" or None (the model's default)
    chunk_length_s: float | None = None  # set: chunked batched decoding (transformers' pipeline)
    stride_length_s: float | None = None  # None: chunk_length_s / 6
    batch_size: int = 1
    num_beams: int = 1
    temperature: float = 0.0
    temperature_fallback: tuple[float, ...] | None = None
    compression_ratio_threshold: float | None = None
    logprob_threshold: float | None = None
    no_speech_threshold: float | None = None
    initial_prompt: str | None = None
    condition_on_previous_text: bool = False
    max_new_tokens: int | None = None
    long_form_sequential: bool = False
    interim_interval_s: float = 1.0


class _Model(Protocol):
    """What the checks read from the loaded pipeline."""

    settings: GenerationSettings
    tok: Any
    max_batch_size: int
    max_beams: int

    @property
    def max_target_positions(self) -> int: ...


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check(o: dict[str, Any], model: _Model) -> dict[str, Any]:
    """Merged option values -> normalised values; InvalidParameter names the bad field."""

    def bad(name: str, why: str):
        return InvalidParameter(f"{name} {why}, got {o.get(name)!r}", metadata={"field": name})

    level = o.get("return_timestamps")
    key = level.lower().removeprefix("timestamp_granularity_") if isinstance(level, str) else level
    if key not in _TIMESTAMPS:
        raise bad("return_timestamps", "must be none, segment or word")
    o["return_timestamps"] = _TIMESTAMPS[key]
    if o["return_timestamps"] == "char":
        raise bad("return_timestamps", "cannot be char for Whisper (word or segment only)")
    if o["return_timestamps"] == "word" and not model.settings.alignment_heads:
        raise bad("return_timestamps", "cannot be word: this model has no alignment heads")
    task = o.get("task")
    task = task.lower().removeprefix("speech_task_") if isinstance(task, str) else task
    if task not in _TASKS:
        raise bad("task", "must be transcribe or translate")
    o["task"] = _TASKS[task]
    language = o.get("language") or None
    if language is not None:
        code = model.tok.language_code(language)
        if not model.settings.is_multilingual:
            if code != "en":
                raise bad("language", "must be English (or unset) for an English-only model")
            code = None
        o["language"] = code
    if not model.settings.is_multilingual and o["task"] == "translate":
        raise bad("task", "cannot be translate for an English-only model")
    if not model.settings.is_multilingual:
        o["task"] = None
    chunk = o.get("chunk_length_s")
    if chunk is not None and (not _finite(chunk) or chunk < 0 or chunk > 30):
        raise bad("chunk_length_s", "must be between 0 and 30 seconds")
    stride = o.get("stride_length_s")
    if stride is not None and (not _finite(stride) or stride < 0 or (chunk and 2 * stride >= chunk)):
        raise bad("stride_length_s", "must be non-negative and less than half of chunk_length_s")
    for name, low, high in (("batch_size", 1, model.max_batch_size), ("num_beams", 1, model.max_beams),
                            ("max_new_tokens", 1, model.max_target_positions)):
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
    prompt_ids(o.get("initial_prompt"), model)  # an over-long prompt fails here, not mid-run
    return o


def prompt_ids(prompt: str | None, model: _Model) -> list[int] | None:
    """The initial prompt's token ids (None without one); at most half the decoder's context."""
    ids = model.tok.prompt_ids(prompt) if prompt else None
    if ids and len(ids) > model.max_target_positions // 2 - 1:
        raise InvalidParameter(f"initial_prompt is too long (at most {model.max_target_positions // 2 - 1} tokens)",
                               metadata={"field": "initial_prompt"})
    return ids


def decode_options(o: WhisperOptions, model: _Model, *, timestamps: bool | None = None) -> DecodeOptions:
    """The decoder's input for one run with these (checked) options."""
    return DecodeOptions(
        return_timestamps=o.return_timestamps != "none" if timestamps is None else timestamps,
        word_timestamps=o.return_timestamps == "word", language=o.language, task=o.task,
        num_beams=o.num_beams or 1, temperatures=(float(o.temperature or 0.0),) + tuple(o.temperature_fallback or ()),
        compression_ratio_threshold=o.compression_ratio_threshold,
        logprob_threshold=o.logprob_threshold, no_speech_threshold=o.no_speech_threshold,
        prompt_ids=prompt_ids(o.initial_prompt, model), condition_on_prev_tokens=bool(o.condition_on_previous_text),
        max_new_tokens=o.max_new_tokens)
