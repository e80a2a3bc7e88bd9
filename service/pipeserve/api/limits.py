"""Bounds on every size-like and numeric field of the task requests, checked when a request
arrives, before any field controls an allocation, a loop or a decoder.

One table, keyed by message and field name, says what each field may hold: numbers a closed
range (and finite), strings a length in UTF-8 bytes, bytes a length, repeated fields a count
(and a bound on each item). `check(message)` walks a request, nested messages included, and
raises INVALID_ARGUMENT naming the field by its path ("options.num_beams",
"audio.raw.sample_rate", "config.channels") with the allowed range in ErrorInfo metadata. A
value that fits these bounds may still be refused by the pipeline for model-specific reasons
(max_new_tokens beyond the model's context, a top_k past the label count is clamped): these
are the limits no model widens. Unset proto3 `optional` fields are skipped; plain scalars are
checked as they are (0 included), which is how an unset sample rate is refused.

tests/test_fuzz.py checks that every numeric, string, bytes and repeated field of every task
request message has an entry here (model/request_id are bounded by the server's name rules).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

from google.protobuf.message import Message

from ..errors import InputTooLarge, InvalidInput, InvalidParameter
from ..inputs.audio import MAX_CHANNELS, MAX_RAW_SAMPLE_RATE, MIN_SAMPLE_RATE
from ..inputs.uri import MAX_URI_CHARS

KiB, MiB = 1 << 10, 1 << 20
# Text a task reads: 1 MiB is far more than any encoder's or decoder's context (a 128k-token
# context is ~512 kB of English), so a longer text is refused before it is tokenized.
MAX_TEXT_BYTES = 1 * MiB
# Labels, targets, stop strings, words of a page, language codes.
MAX_SHORT_TEXT_BYTES = 1 * KiB
# Token counts, window lengths and strides: no model we serve has a context beyond this.
MAX_TOKENS = 1 << 20
# A result list (top_k) longer than this is never useful, and each item costs a message.
MAX_TOP_K = 1 << 16


@dataclass(frozen=True)
class Number:
    """A finite number in [low, high] (`low_open`: low itself excluded). `of_input`: the number
    describes the input data (a sample rate), so a bad one is INVALID_INPUT, not a bad option."""

    low: float
    high: float
    low_open: bool = False
    of_input: bool = False

    def problem(self, value) -> str | None:
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        if value < self.low or value > self.high or (self.low_open and value == self.low):
            left = "(" if self.low_open else "["
            return f"must be in {left}{self.low:g}, {self.high:g}]"
        return None


@dataclass(frozen=True)
class Size:
    """A string (UTF-8 bytes) or bytes field of at most `max_bytes`."""

    max_bytes: int

    def problem(self, value) -> str | None:
        size = len(value.encode("utf-8", "surrogatepass")) if isinstance(value, str) else len(value)
        return f"is {size} bytes; at most {self.max_bytes} are accepted" if size > self.max_bytes else None


@dataclass(frozen=True)
class Items:
    """A repeated field: at most `max_count` items, each within `each` (when given)."""

    max_count: int
    each: Union[Number, Size, None] = None


@dataclass(frozen=True)
class Nested:
    """A message field whose own fields the table bounds."""


@dataclass(frozen=True)
class Elsewhere:
    """A field bounded at another point, named in `where` (the decoders, the servicer)."""

    where: str


Rule = Union[Number, Size, Items, Nested, Elsewhere]

_TOP_K = Number(1, MAX_TOP_K)
_TOKENS = Number(1, MAX_TOKENS)
_STRIDE = Number(0, MAX_TOKENS)
_TEXT = Size(MAX_TEXT_BYTES)
_SHORT = Size(MAX_SHORT_TEXT_BYTES)
_SAMPLE_RATE = Number(MIN_SAMPLE_RATE, MAX_RAW_SAMPLE_RATE, of_input=True)
_CHANNELS = Number(0, MAX_CHANNELS, of_input=True)  # 0: unset, which means mono
_ENCODED_IMAGE = Elsewhere("max_message_bytes, then image.open_image: max_image_pixels from the header, "
                           "before any pixel is decoded")
_ENCODED_AUDIO = Elsewhere("max_message_bytes, then audio.decode_audio: rate range, max_audio_seconds and "
                           "decoded samples per input byte, before and while decoding")
_RAW_SAMPLES = Elsewhere("audio.decode_raw_pcm: whole frames, max_audio_seconds")
# A chat: the whole of it must still fit a context, which no model we serve makes longer than
# MAX_TOKENS; 4096 turns is far past any conversation a template is rendered for.
MAX_CHAT_MESSAGES = 4096
_CHAT = Items(MAX_CHAT_MESSAGES)
# Whisper's thresholds are log-probabilities and ratios; nothing sensible lies beyond these.
_THRESHOLD = Number(-1e6, 1e6)

RULES: dict[str, dict[str, Rule]] = {
    "pipeserve.v1.ImageInput": {"data": _ENCODED_IMAGE, "uri": Size(MAX_URI_CHARS)},
    "pipeserve.v1.AudioInput": {"data": _ENCODED_AUDIO, "raw": Nested(), "uri": Size(MAX_URI_CHARS)},
    "pipeserve.v1.RawAudio": {"samples": _RAW_SAMPLES, "sample_rate": _SAMPLE_RATE, "channels": _CHANNELS},
    "pipeserve.v1.TranscriptionOptions": {
        "language": Size(64), "chunk_length_s": Number(0, 600), "stride_length_s": Number(0, 300),
        "batch_size": Number(1, 64), "num_beams": Number(1, 16), "temperature": Number(0, 5),
        "temperature_fallback": Items(16, Number(0, 5)), "compression_ratio_threshold": _THRESHOLD,
        "logprob_threshold": _THRESHOLD, "no_speech_threshold": _THRESHOLD, "initial_prompt": Size(8 * KiB),
        "max_new_tokens": Number(1, 4096),
    },
    "pipeserve.v1.TranscribeRequest": {"audio": Nested(), "options": Nested()},
    "pipeserve.v1.TranscribeStreamRequest": {"audio": Nested(), "options": Nested()},
    "pipeserve.v1.StreamingTranscribeRequest": {"config": Nested(), "audio": Nested()},
    "pipeserve.v1.StreamingConfig": {
        "options": Nested(), "sample_rate": _SAMPLE_RATE, "channels": _CHANNELS,
        # Interim results at most every minute; more often than every 50 ms is pure overhead.
        "interim_interval_s": Number(0.05, 60),
    },
    "pipeserve.v1.AudioChunk": {"samples": Elsewhere("the servicer: 30 s of audio per chunk, whole frames, "
                                                     "max_audio_seconds per stream")},
    "pipeserve.v1.GenerationOptions": {
        "max_new_tokens": _TOKENS, "min_new_tokens": Number(0, MAX_TOKENS), "temperature": Number(0, 100),
        "top_k": Number(0, MAX_TOKENS), "top_p": Number(0, 1), "typical_p": Number(0, 1),
        "repetition_penalty": Number(0, 100, low_open=True), "no_repeat_ngram_size": Number(0, 1024),
        "stop": Items(16, Size(4 * 256)), "seed": Number(0, (1 << 64) - 1), "num_return_sequences": Number(1, 16),
        "logprobs": Number(0, 20),
    },
    "pipeserve.v1.GenerateRequest": {"prompt": _TEXT, "options": Nested(), "messages": _CHAT},
    "pipeserve.v1.GenerateStreamRequest": {"prompt": _TEXT, "options": Nested(), "messages": _CHAT},
    # A role longer than this is refused by inputs/chat.check_messages anyway (32 characters).
    "pipeserve.v1.ChatMessage": {"role": Size(64), "content": _TEXT},
    "pipeserve.v1.ClassifyImageRequest": {"image": Nested(), "top_k": _TOP_K},
    "pipeserve.v1.ClassifyTextRequest": {"text": _TEXT, "text_pair": _TEXT, "top_k": _TOP_K},
    "pipeserve.v1.ClassifyTokensRequest": {"text": _TEXT, "ignore_labels": Items(1024, _SHORT), "stride": _STRIDE},
    "pipeserve.v1.ClassifyZeroShotRequest": {
        "sequence": _TEXT, "candidate_labels": Items(128, _SHORT), "hypothesis_template": _SHORT,
    },
    "pipeserve.v1.FillMaskRequest": {"text": _TEXT, "top_k": _TOP_K, "targets": Items(1024, _SHORT)},
    "pipeserve.v1.ExtractFeaturesRequest": {"text": _TEXT},
    "pipeserve.v1.AnswerQuestionRequest": {
        "question": _TEXT, "context": _TEXT, "top_k": _TOP_K, "doc_stride": _STRIDE, "max_answer_len": _TOKENS,
        "max_seq_len": _TOKENS, "max_question_len": _TOKENS,
    },
    "pipeserve.v1.AnswerDocumentQuestionRequest": {
        "image": Nested(), "question": Size(16 * KiB), "words": Items(10_000), "top_k": _TOP_K,
        "max_answer_len": _TOKENS, "doc_stride": _STRIDE, "max_seq_len": _TOKENS, "max_question_len": _TOKENS,
        "ocr_lang": Size(64),
    },
    "pipeserve.v1.DocumentWord": {"text": _SHORT, "box": Nested()},
    # LayoutLM's 2-D position tables hold 1024 rows; boxes are normalised to 0..1000 as
    # transformers' apply_tesseract normalises them.
    "pipeserve.v1.BoundingBox": {"x0": Number(0, 1000), "y0": Number(0, 1000), "x1": Number(0, 1000),
                                 "y1": Number(0, 1000)},
}

# Fields no rule is needed for: names and ids (bounded by the server's name rules), and
# booleans and enums (the contract's values are checked before any servicer runs).
UNBOUNDED_BY_DESIGN = frozenset({"model", "request_id"})


def check(message: Message, path: str = "") -> None:
    """Raises INVALID_ARGUMENT for the first field of `message` (nested ones included) outside
    its bound; `path` prefixes field names in errors ("config." for a stream's config)."""
    rules = RULES.get(message.DESCRIPTOR.full_name)
    if not rules:
        return
    for name, rule in rules.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        where = path + name
        if isinstance(rule, Items):
            values = getattr(message, name)
            if len(values) > rule.max_count:
                raise InputTooLarge(f"{where} has {len(values)} items; at most {rule.max_count} are accepted",
                                    metadata={"field": where, "limit": rule.max_count})
            for i, value in enumerate(values):
                if isinstance(value, Message):
                    check(value, f"{where}[{i}].")
                elif rule.each is not None:
                    _check_value(rule.each, value, f"{where}[{i}]")
            continue
        if field.has_presence and not message.HasField(name):
            continue
        value = getattr(message, name)
        if isinstance(rule, Elsewhere):
            continue
        if isinstance(rule, Nested):
            if isinstance(value, Message):
                check(value, where + ".")
            continue
        _check_value(rule, value, where)


def _check_value(rule: Union[Number, Size], value, where: str) -> None:
    problem = rule.problem(value)
    if problem is None:
        return
    if isinstance(rule, Size):
        raise InputTooLarge(f"{where} {problem}", metadata={"field": where, "limit": rule.max_bytes})
    shown = value if not isinstance(value, float) else f"{value:g}"
    error = InvalidInput if rule.of_input else InvalidParameter
    raise error(f"{where} {problem}, got {shown}",
                           metadata={"field": where, "min": f"{rule.low:g}", "max": f"{rule.high:g}"})
