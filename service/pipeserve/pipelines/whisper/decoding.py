"""Whisper decoding: the window loop, temperature fallback, no-speech detection, prompts and
the sequential (seek) long-form loop.

Ports transformers/models/whisper/generation_whisper.py (WhisperGenerationMixin.generate,
generate_with_fallback, _retrieve_init_tokens, _need_fallback, detect_language) in the shape of
openai-whisper's decoding.py: one loop (`decode_window`) owns the key/value cache, the decoder
steps, the stopping and the yield points; a token decoder (token_decoders.py: greedy, sampling,
beam search) chooses the tokens, and logit filters (logit_filters.py) applied as a list shape
the scores first, in the order generate() applies its processors: begin-suppress, suppress,
timestamps. Segments and their times live in segments.py, word-level times in word_timing.py.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ...errors import InvalidParameter
from ...models.whisper import one_row_as_two
from ...scheduling import compute
from .features import N_FRAMES
from .generation_settings import GenerationSettings
from .logit_filters import (ApplyTimestampRules, InitialTimestamp, LogitFilter, LogitFilters, PreferTimestamps,
                            SuppressBlank, SuppressTokens, token_index)
from .segments import FRAME_SECONDS, Segment, retrieve_segments
from .token_decoders import BeamSearchDecoder, GreedyDecoder, TokenDecoder, WindowResult
from .tokenizer import WhisperTokenizer
from .word_timing import token_times

__all__ = ["DecodeOptions", "GenerationSettings", "InlineRunner", "Segment", "WindowRunner", "generate",
           "compression_ratio", "text_compression_ratio"]

# Windows go through the encoder a few at a time: its 1500x1500 attention maps are the largest
# activations (B x heads x 9 MB), and bigger batches do not run faster.
ENCODER_BATCH = 2


@dataclass
class DecodeOptions:
    return_timestamps: bool = False
    word_timestamps: bool = False
    language: str | None = None  # a code such as "en"
    task: str | None = None  # "transcribe" | "translate"
    num_beams: int = 1
    temperatures: tuple[float, ...] = (0.0,)
    compression_ratio_threshold: float | None = None
    logprob_threshold: float | None = None
    no_speech_threshold: float | None = None
    prompt_ids: list[int] | None = None
    condition_on_prev_tokens: bool = False
    max_new_tokens: int | None = None
    length_penalty: float = 1.0
    seed: int | None = None


def _no_speech_prob(logits_at_sot: torch.Tensor, s: GenerationSettings) -> list[float]:
    # WhisperNoSpeechDetection: P(<|nocaptions|>) at the <|startoftranscript|> position.
    return logits_at_sot.float().softmax(-1)[:, s.no_timestamps_token_id - 1].tolist()


def window_filters(s: GenerationSettings, vocab: int, device, timestamps: bool) -> LogitFilters:
    """The logits processors generate() applies to every window, in its order."""
    filters: list[LogitFilter] = []
    begin = token_index(s.begin_suppress_tokens, vocab, device)
    if begin.numel():
        filters.append(SuppressBlank(begin))
    suppress = token_index(s.suppress_tokens, vocab, device)
    if suppress.numel():
        filters.append(SuppressTokens(suppress))
    if timestamps:
        ts_begin = s.no_timestamps_token_id + 1
        filters += [ApplyTimestampRules(s.no_timestamps_token_id, s.eos_token_id),
                    InitialTimestamp(ts_begin, s.max_initial_timestamp_index), PreferTimestamps(ts_begin)]
    return LogitFilters(filters)


def prefill_hidden(model_decoder, encoder_out: torch.Tensor, prompt: torch.Tensor, sot_index: int,
                   decoder: TokenDecoder):
    """A window's prompt through the decoder layers -> (its cache, the final hidden states at
    the <|startoftranscript|> position `sot_index` and the last position [rows, 2, d_model]):
    `first_scores` reads the vocabulary projection of those two positions."""
    cache = model_decoder.new_cache(encoder_out, prompt.shape[1] + decoder.max_new)
    return cache, model_decoder.hidden(prompt, cache, logits_at=[sot_index, -1])


def first_scores(logits: torch.Tensor, s: GenerationSettings, filters: LogitFilters, decoder: TokenDecoder):
    """The projection of prefill_hidden's positions [rows, 2, vocab] -> (the no-speech
    probability of each row, the first step's scores)."""
    return _no_speech_prob(logits[:, 0], s), filters(decoder.scores(logits[:, 1]), decoder.sequences)


def prefill(model_decoder, encoder_out: torch.Tensor, prompt: torch.Tensor, sot_index: int,
            s: GenerationSettings, filters: LogitFilters, decoder: TokenDecoder):
    """A window's prompt through the decoder -> (its cache, the no-speech probability of each
    row, read at the <|startoftranscript|> position `sot_index`, the first step's scores)."""
    cache, h = prefill_hidden(model_decoder, encoder_out, prompt, sot_index, decoder)
    return (cache, *first_scores(project(model_decoder, h), s, filters, decoder))


def project(model_decoder, h: torch.Tensor) -> torch.Tensor:
    """The float32 vocabulary projection of hidden states [rows, d_model], one row computed as
    two so that a row's logits do not depend on how many rows decode together."""
    return one_row_as_two(model_decoder.proj_out, h)


def decode_window(model, encoder_out: torch.Tensor, prompt: torch.Tensor, sot_index: int, s: GenerationSettings,
                  filters: LogitFilters, decoder: TokenDecoder,
                  should_stop: Callable[[], bool] | None = None) -> list[WindowResult]:
    """The decoding loop of one window for every row of `prompt` [rows, length]: runs the prompt
    (the no-speech probability is read at its <|startoftranscript|>, `sot_index`), then one cached
    decoder step per token; the filters shape each step's scores and `decoder` chooses, until it
    is done or `should_stop` says so. Between steps the compute lane lets short calls through:
    a window holds it for ~0.3 s. (batch_scheduler.py runs the same loop over the windows of
    many calls at once.)"""
    model_decoder = model.decoder
    cache, no_speech, scores = prefill(model_decoder, encoder_out, prompt, sot_index, s, filters, decoder)
    # Greedy steps after the first read the projection through the verified head: the same
    # choices and log-probabilities as float32 logits at half the bytes.
    screened = model_decoder.verified_head if decoder.screened_head_ok else None
    while True:
        step = decoder.update(scores)
        if step.done or (should_stop is not None and should_stop()):
            break
        if step.reorder is not None:
            cache.reorder(step.reorder)
        compute.yield_point()
        h = model_decoder.hidden(torch.tensor(step.tokens, device=prompt.device)[:, None], cache)[:, -1]
        generated = decoder.sequences
        if screened is not None:
            scores = filters.read(screened.scores(h, lambda x: filters.mask(x, generated),
                                                  lambda x: project(model_decoder, x)), generated)
        else:
            scores = filters(decoder.scores(project(model_decoder, h)), generated)
    return decoder.finalize(no_speech)


class WindowRunner:
    """Where a transcription's model work runs: `InlineRunner` on the caller's thread (one call
    alone), or a session of the model's batch scheduler (batch_scheduler.py), which encodes and
    decodes the windows of concurrent calls together. `batch_rows`: the most windows one of
    this caller's decoding steps served together."""

    batch_rows = 1

    def encode(self, model, windows: torch.Tensor) -> torch.Tensor:
        """Log-mel windows [n, n_mels, 3000] (the model's dtype) -> encoder output [n, 1500, d]."""
        raise NotImplementedError

    def decode(self, model, encoder_out: torch.Tensor, prompt: torch.Tensor, sot_index: int, s: GenerationSettings,
               filters: LogitFilters, decoder: TokenDecoder,
               should_stop: Callable[[], bool] | None) -> list[WindowResult]:
        """`decode_window`'s results for one window's rows."""
        raise NotImplementedError

    def call(self, fn: Callable, *args, **kwargs):
        """Other model work of the call (features, language detection, word timing)."""
        raise NotImplementedError


class InlineRunner(WindowRunner):
    """The caller computes: on the compute lane when the caller is a lane task, yielding to
    other lane work between encoder layers and decoder steps."""

    def encode(self, model, windows: torch.Tensor) -> torch.Tensor:
        return torch.cat([model.encoder(windows[k:k + ENCODER_BATCH], after_layer=compute.yield_point)
                          for k in range(0, windows.shape[0], ENCODER_BATCH)])

    def decode(self, model, encoder_out, prompt, sot_index, s, filters, decoder, should_stop):
        self.batch_rows = max(self.batch_rows, prompt.shape[0] if isinstance(decoder, GreedyDecoder) else 1)
        return decode_window(model, encoder_out, prompt, sot_index, s, filters, decoder, should_stop)

    def call(self, fn: Callable, *args, **kwargs):
        return fn(*args, **kwargs)


def decode_rows(model, encoder_out: torch.Tensor, prompt: torch.Tensor, sot_index: int, max_new: int,
                s: GenerationSettings, filters: LogitFilters, opts: DecodeOptions, temperature: float,
                generator: torch.Generator | None, should_stop: Callable[[], bool] | None,
                runner: WindowRunner | None = None) -> list[WindowResult]:
    """One window of every row at one temperature: greedy or sampled rows decode together; beam
    search decodes each row on its own `num_beams` decoder rows."""
    runner = runner or InlineRunner()
    if temperature > 0 or opts.num_beams <= 1:
        decoder = GreedyDecoder(prompt.shape[0], max_new, s.eos_token_id, s.pad_token_id, temperature, generator)
        return runner.decode(model, encoder_out, prompt, sot_index, s, filters, decoder, should_stop)
    beams = opts.num_beams
    results = []
    for r in range(prompt.shape[0]):
        decoder = BeamSearchDecoder(beams, max_new, s.eos_token_id, opts.length_penalty, prompt.device)
        results += runner.decode(model, encoder_out[r:r + 1].expand(beams, -1, -1),
                                 prompt[r:r + 1].expand(beams, -1).contiguous(), sot_index, s, filters, decoder,
                                 should_stop)
    return results


def compression_ratio(tokens: list[int], vocab_size: int) -> float:
    # generation_whisper._retrieve_compression_ratio (token bytes, not text)
    length = int(math.log2(vocab_size) / 8) + 1
    data = b"".join(int(t).to_bytes(length, "little") for t in tokens)
    return len(data) / len(zlib.compress(data)) if data else 0.0


def text_compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def init_tokens(s: GenerationSettings, tok: WhisperTokenizer, opts: DecodeOptions,
                detect: Callable[[], int] | None) -> tuple[list[int], int | None]:
    """generation_whisper._retrieve_init_tokens -> (prompt start tokens, language token or None)."""
    if not s.is_multilingual and (opts.language or (opts.task and opts.task != "transcribe")):
        raise InvalidParameter("language and task cannot be set for an English-only model")
    tokens: list[int | None] = [s.decoder_start_token_id]
    if opts.task is None and opts.language is None:
        forced = list(s.forced_decoder_ids)
        i = 1
        while forced and forced[0][0] == i:
            tokens.append(forced[0][1])
            forced = forced[1:]
            i += 1
    lang_undefined = len(tokens) <= 1 or tokens[1] is None
    lang_id = None
    if opts.language is not None:
        if opts.language not in s.lang_to_id:
            raise InvalidParameter(f"language {opts.language!r} is not supported by this model")
        lang_id = s.lang_to_id[opts.language]
    elif s.lang_to_id and lang_undefined and detect is not None:
        lang_id = detect()
    if lang_id is not None:
        if len(tokens) > 1:
            tokens[1] = lang_id
        else:
            tokens.append(lang_id)
    task_ids = set(s.task_to_id.values())
    if opts.task is not None:
        if opts.task not in s.task_to_id:
            raise InvalidParameter(f"task {opts.task!r} is not supported by this model")
        task_id = s.task_to_id[opts.task]
        tokens.append(task_id)  # generation_whisper appends, then replace_or_add (kept for parity)
        if any(t in task_ids for t in tokens):
            tokens = [task_id if t in task_ids else t for t in tokens]
    elif opts.language is not None and s.task_to_id and not any(t in task_ids for t in tokens):
        tokens.append(s.task_to_id["transcribe"])
    if not opts.return_timestamps and tokens[-1] != s.no_timestamps_token_id:
        tokens.append(s.no_timestamps_token_id)
    elif opts.return_timestamps and tokens[-1] == s.no_timestamps_token_id:
        tokens = tokens[:-1]
    found_lang = next((t for t in tokens if t is not None and t in set(s.lang_to_id.values())), None)
    return [t for t in tokens if t is not None], found_lang


def language_probabilities(model, encoder_out: torch.Tensor, s: GenerationSettings) -> torch.Tensor:
    """P(language token | <|startoftranscript|>) over the language tokens: [B, n_langs]
    (generation_whisper.detect_language takes the argmax of the same logits)."""
    cache = model.decoder.new_cache(encoder_out, 1)
    sot = torch.full((encoder_out.shape[0], 1), s.decoder_start_token_id, device=encoder_out.device)
    logits = model.decoder(sot, cache)[:, -1].float()
    ids = torch.tensor(list(s.lang_to_id.values()), device=encoder_out.device)
    return logits[:, ids].softmax(-1)


def generate(model, features: torch.Tensor, num_frames: list[int], s: GenerationSettings,
             tok: WhisperTokenizer, opts: DecodeOptions, *, should_stop: Callable[[], bool] | None = None,
             on_language: Callable[[list[int | None], torch.Tensor | None], None] | None = None,
             runner: WindowRunner | None = None) -> Iterator[tuple[int, list[Segment]]]:
    """The seek loop of WhisperGenerationMixin.generate for rows of log-mel `features`
    [B, n_mels, frames] with `num_frames` real frames each. Yields (row, new segments) after
    every decoded window, so callers can stream; windows of several rows decode as one batch
    when their prompts have equal length. The model work runs on `runner` (default: here)."""
    runner = runner or InlineRunner()
    device = features.device
    total = features.shape[-1]
    shortform = total <= N_FRAMES
    opts.return_timestamps = opts.return_timestamps or not shortform or opts.word_timestamps
    tb = s.no_timestamps_token_id + 1
    vocab = model.config.vocab_size
    max_frames = [total if (shortform or len(num_frames) == 1) else n for n in num_frames]
    seek = [0] * features.shape[0]
    prev_tokens: list[list[list[int]]] = [[] for _ in seek]  # per row: token lists of its segments
    if opts.prompt_ids:
        first = opts.prompt_ids[1:] if opts.prompt_ids[0] == s.prev_sot_token_id else opts.prompt_ids
        prev_tokens = [[list(first)] for _ in seek]
    filters = window_filters(s, vocab, device, opts.return_timestamps)
    generator = None
    if opts.seed is not None:
        generator = torch.Generator(device=device).manual_seed(opts.seed)
    starts: list[list[int]] | None = None
    cond_ok = [True] * len(seek)  # generate_with_fallback: no conditioning after a hot (>= 0.5) window
    while any(sk < mf for sk, mf in zip(seek, max_frames)):
        if should_stop is not None and should_stop():
            return
        rows = [r for r in range(len(seek)) if seek[r] < max_frames[r]]
        windows = []
        for r in rows:
            n = min(max_frames[r] - seek[r], N_FRAMES)
            part = features[r:r + 1, :, seek[r]:seek[r] + n]
            windows.append(F.pad(part, (0, N_FRAMES - part.shape[-1])))
        dtype = next(model.parameters()).dtype
        encoder_out = runner.encode(model, torch.cat(windows).to(dtype))
        if starts is None:  # language detection on the first window, as generate() does
            probs = runner.call(language_probabilities, model, encoder_out, s) if s.lang_to_id \
                and opts.language is None and s.is_multilingual else None
            langs = list(s.lang_to_id.values())
            starts, found = [], []
            for i in range(len(rows)):
                detect = (lambda i=i: langs[int(probs[i].argmax())]) if probs is not None else None
                t, lang = init_tokens(s, tok, opts, detect)
                starts.append(t)
                found.append(lang)
            if on_language is not None:
                on_language(found, probs)
        prompts = []
        for i, r in enumerate(rows):
            start = starts[r]
            cond = opts.condition_on_prev_tokens and cond_ok[r] and prev_tokens[r] and any(prev_tokens[r])
            if cond:
                flat = [t for seg in prev_tokens[r] for t in (seg[:-1] if len(seg) > 2 and seg[-2] >= tb else seg)]
                cut = model.config.max_target_positions // 2 - 1
                prompts.append(([s.prev_sot_token_id] if s.prev_sot_token_id is not None else []) + flat[-cut:] + start)
            elif opts.prompt_ids:
                prompts.append(list(opts.prompt_ids) + start)
            else:
                prompts.append(list(start))
        results = _decode_with_fallback(model, encoder_out, prompts, [starts[r] for r in rows], s, filters, opts,
                                        vocab, generator, should_stop, runner)
        # transformers crops the alignment heads' attention to the rows' remaining frames once for
        # the batch when they all have the same count, then once more per row; see token_times.
        uniform_frames = len({num_frames[r] - seek[r] for r in rows}) == 1
        for i, r in enumerate(rows):
            res, temperature, skip = results[i]
            cond_ok[r] = temperature < 0.5
            n = min(max_frames[r] - seek[r], N_FRAMES)
            if skip:
                seek[r] += n
                yield r, []
                continue
            seq = res.tokens
            if seq and seq[-1] == s.eos_token_id:
                seq = seq[:-1]
            avg = (res.sum_logprob if res.sum_logprob is not None else
                   (sum(res.logprobs) / max(1, len(res.logprobs))))
            extra = dict(avg_logprob=avg, no_speech_prob=res.no_speech_prob, temperature=temperature,
                         compression_ratio=compression_ratio(res.tokens, vocab))
            time_offset = seek[r] * FRAME_SECONDS
            segments, consumed, ranges = retrieve_segments(seq, tb, time_offset, n, extra) if seq else ([], n, [])
            if opts.word_timestamps and seq and s.alignment_heads:
                times, probs = runner.call(token_times, model, encoder_out[i:i + 1], prompts[i], res.tokens, s,
                                           num_frames=min(num_frames[r] - seek[r], N_FRAMES) if num_frames[r] else None,
                                           crop_twice=uniform_frames)
                p = len(prompts[i])
                for seg, (a, b) in zip(segments, ranges):
                    seg.token_times = [time_offset + t for t in times[p + a:p + b]]
                    seg.token_probs = probs[p + a:p + b]
            seek[r] += consumed
            prev_tokens[r].extend(seg.tokens for seg in segments)
            yield r, segments


def _decode_with_fallback(model, encoder_out, prompts, starts, s, filters, opts, vocab, generator, should_stop,
                          runner):
    """generate_with_fallback: decode all rows, retry those failing the thresholds at the next
    temperature. -> per row (WindowResult, temperature, skip)."""
    out: list[tuple[WindowResult, float, bool] | None] = [None] * len(prompts)
    pending = list(range(len(prompts)))
    temps = opts.temperatures or (0.0,)
    for k, temperature in enumerate(temps):
        decoded = {}
        groups: dict[tuple[int, int], list[int]] = {}
        for i in pending:  # rows decode together when their prompts align
            groups.setdefault((len(prompts[i]), len(starts[i])), []).append(i)
        for (plen, slen), idx in groups.items():
            prompt = torch.tensor([prompts[i] for i in idx], device=encoder_out.device)
            max_new = model.config.max_target_positions - plen
            if opts.max_new_tokens is not None:
                max_new = min(opts.max_new_tokens, max_new)
            else:
                max_new = min(s.max_length, max_new)
            if max_new <= 0:
                raise InvalidParameter(f"the prompt ({plen} tokens) leaves no room to generate")
            sot_index = plen - slen
            enc = encoder_out[idx]
            res = decode_rows(model, enc, prompt, sot_index, max_new, s, filters, opts, temperature, generator,
                              should_stop, runner)
            decoded.update(zip(idx, res))
        still = []
        for i in pending:
            res = decoded[i]
            needs, skip = False, False
            if opts.compression_ratio_threshold is not None and \
                    compression_ratio(res.tokens, vocab) > opts.compression_ratio_threshold:
                needs = True
            avg = None
            if opts.logprob_threshold is not None:
                avg = res.sum_logprob if res.sum_logprob is not None else sum(res.logprobs) / max(1, len(res.tokens))
                if avg < opts.logprob_threshold:
                    needs = True
            if opts.no_speech_threshold is not None and avg is not None and avg < opts.logprob_threshold \
                    and res.no_speech_prob > opts.no_speech_threshold:
                needs, skip = False, True
            out[i] = (res, temperature, skip)
            if needs:
                still.append(i)
        pending = still
        if not pending:
            break
    return out
