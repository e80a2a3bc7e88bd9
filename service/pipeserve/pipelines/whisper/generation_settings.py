"""The generation settings Whisper decoding reads: a transformers checkpoint's
generation_config.json (HF names), or their equivalents for a CTranslate2 (faster-whisper)
checkpoint from its config.json and tokenizer."""
from __future__ import annotations

from dataclasses import dataclass, field

from .tokenizer import WhisperTokenizer


@dataclass(frozen=True)
class GenerationSettings:
    """The model's generation_config.json fields that decoding needs (HF names), or their
    equivalents from a CTranslate2 config.json + tokenizer."""

    decoder_start_token_id: int
    eos_token_id: int
    pad_token_id: int
    no_timestamps_token_id: int
    prev_sot_token_id: int | None
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()
    alignment_heads: tuple[tuple[int, int], ...] = ()
    lang_to_id: dict[str, int] = field(default_factory=dict)  # language code -> token id
    task_to_id: dict[str, int] = field(default_factory=dict)
    is_multilingual: bool = False
    max_initial_timestamp_index: int | None = None
    max_length: int = 448
    forced_decoder_ids: tuple[tuple[int, int | None], ...] = ()
    median_filter_width: int = 7

    @classmethod
    def from_config(cls, gen: dict | None, tok: WhisperTokenizer, model_config: dict | None = None,
                    ct2_config: dict | None = None) -> "GenerationSettings":
        gen, model_config = gen or {}, model_config or {}
        if ct2_config is not None:  # faster-whisper layout: what its transcribe() uses
            multilingual = tok.is_multilingual
            forced = ((1, None), (2, tok.transcribe)) if multilingual else ((1, tok.no_timestamps),)
            return cls(
                decoder_start_token_id=tok.sot, eos_token_id=tok.eot, pad_token_id=tok.eot,
                no_timestamps_token_id=tok.no_timestamps, prev_sot_token_id=tok.sot_prev,
                suppress_tokens=tuple(ct2_config.get("suppress_ids", ())),
                begin_suppress_tokens=tuple(ct2_config.get("suppress_ids_begin", ())),
                alignment_heads=tuple(tuple(h) for h in ct2_config.get("alignment_heads", ())),
                lang_to_id=dict(tok.lang_to_id) if multilingual else {},
                task_to_id={"transcribe": tok.transcribe, "translate": tok.translate} if multilingual else {},
                is_multilingual=multilingual, max_initial_timestamp_index=50, forced_decoder_ids=forced)

        def pick(name, default=None):
            value = gen.get(name)
            return model_config.get(name, default) if value is None else value

        eos = pick("eos_token_id", tok.eot)
        eos = eos[0] if isinstance(eos, list) else eos
        langs = {k.strip("<|>"): v for k, v in (gen.get("lang_to_id") or {}).items()}
        return cls(
            decoder_start_token_id=pick("decoder_start_token_id", tok.sot), eos_token_id=eos,
            pad_token_id=pick("pad_token_id", eos),
            no_timestamps_token_id=gen.get("no_timestamps_token_id", tok.no_timestamps),
            prev_sot_token_id=gen.get("prev_sot_token_id", tok.sot_prev),
            suppress_tokens=tuple(pick("suppress_tokens") or ()),
            begin_suppress_tokens=tuple(pick("begin_suppress_tokens") or ()),
            alignment_heads=tuple(tuple(h) for h in gen.get("alignment_heads") or ()),
            lang_to_id=langs, task_to_id=dict(gen.get("task_to_id") or {}),
            is_multilingual=bool(gen.get("is_multilingual", bool(langs))),
            max_initial_timestamp_index=gen.get("max_initial_timestamp_index"),
            max_length=gen.get("max_length") or 448,
            forced_decoder_ids=tuple(tuple(x) for x in (pick("forced_decoder_ids") or ())),
            median_filter_width=model_config.get("median_filter_width", 7))
