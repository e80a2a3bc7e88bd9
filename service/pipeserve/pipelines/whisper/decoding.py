"""Whisper decoding: prompts, logit rules, greedy / sampling / beam search, temperature
fallback, no-speech detection, the sequential (seek) long-form loop and word-level times.

Ports transformers/models/whisper/generation_whisper.py (WhisperGenerationMixin.generate,
generate_with_fallback, _retrieve_init_tokens, _retrieve_segment, _need_fallback,
_extract_token_timestamps, _dynamic_time_warping, _median_filter) and the logits processors
of transformers/generation/logits_process.py (WhisperTimeStampLogitsProcessor,
SuppressTokensLogitsProcessor, SuppressTokensAtBeginLogitsProcessor, WhisperNoSpeechDetection),
applied in the order generate() applies them: begin-suppress, suppress, timestamps.

Longer than 450 lines: prompts, logit rules, the greedy and beam loops and word timing still
share this module; issue 14 item 4 splits it into one loop, token decoders and logit filters.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import InvalidParameter
from ...scheduling import compute
from .features import N_FRAMES
from .tokenizer import WhisperTokenizer

TIME_PRECISION = 0.02  # seconds per timestamp token: 30 s / 1500 encoder positions
INPUT_STRIDE = 2  # mel frames per encoder position (conv2 stride)
FRAME_SECONDS = 0.01  # seconds per mel frame (hop 160 at 16 kHz)
ENCODER_BATCH = 2  # windows encoded together (see generate)


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


@dataclass
class WindowResult:
    """One decoded window of one row: generated tokens (with a trailing eos if one was produced)."""

    tokens: list[int]
    logprobs: list[float]
    no_speech_prob: float
    sum_logprob: float | None = None  # beam search: the hypothesis score


class LogitRules:
    """The logits processors of one window, applied to float32 scores [rows, vocab]."""

    def __init__(self, s: GenerationSettings, vocab: int, device, timestamps: bool):
        self.s, self.timestamps = s, timestamps
        self.ts_begin = s.no_timestamps_token_id + 1
        # Index lists, not vocabulary-sized masks: a scatter of ~100 ids costs far less per step.
        self.suppress = torch.tensor(sorted({t for t in s.suppress_tokens if t < vocab}), dtype=torch.long, device=device)
        self.begin = torch.tensor(sorted({t for t in s.begin_suppress_tokens if t < vocab}), dtype=torch.long, device=device)

    def __call__(self, scores: torch.Tensor, generated: list[list[int]]) -> torch.Tensor:
        self.mask(scores, generated)
        return self.timestamp_choice(scores)

    def mask(self, scores: torch.Tensor, generated: list[list[int]]) -> None:
        """The rules that depend on the tokens so far only (in place): suppressed tokens and the
        timestamp ordering rules. `timestamp_choice` is the one that reads the scores."""
        step = len(generated[0])
        if step == 0 and self.begin.numel():
            scores[:, self.begin] = -math.inf
        if self.suppress.numel():
            scores[:, self.suppress] = -math.inf
        if self.timestamps:
            self._timestamp_masks(scores, generated, step)

    def _timestamp_masks(self, scores, generated, step):
        # logits_process.WhisperTimeStampLogitsProcessor.__call__ up to its log-softmax
        tb, eos = self.ts_begin, self.s.eos_token_id
        scores[:, self.s.no_timestamps_token_id] = -math.inf
        for k, seq in enumerate(generated):
            last_ts = len(seq) >= 1 and seq[-1] >= tb
            penultimate_ts = len(seq) < 2 or seq[-2] >= tb
            if last_ts:
                if penultimate_ts:
                    scores[k, tb:] = -math.inf
                else:
                    scores[k, :eos] = -math.inf
            limit = tb
            stamps = [t for t in seq if t >= tb]
            if stamps:
                limit = stamps[-1] if (last_ts and not penultimate_ts) else stamps[-1] + 1
            if limit > tb:  # timestamps never go back
                scores[k, tb:limit] = -math.inf
        if step == 0:
            scores[:, :tb] = -math.inf
            if self.s.max_initial_timestamp_index is not None:
                scores[:, tb + self.s.max_initial_timestamp_index + 1:] = -math.inf

    def timestamp_choice(self, scores: torch.Tensor) -> torch.Tensor:
        """WhisperTimeStampLogitsProcessor's last rule: where the timestamps together are more
        likely than the best text token, only timestamps remain (in place)."""
        if not self.timestamps:
            return scores
        tb = self.ts_begin
        # transformers compares log-probabilities; the log-softmax shifts both sides by the
        # same normaliser, so the raw scores decide the same (up to rounding) without a pass
        # over the vocabulary.
        ts_mass = scores[:, tb:].float().logsumexp(dim=-1)
        text_max = scores[:, :tb].amax(dim=-1)
        rows = (ts_mass > text_max).nonzero().flatten().tolist()
        for k in rows:
            scores[k, :tb] = -math.inf
        return scores


def _no_speech_prob(logits_at_sot: torch.Tensor, s: GenerationSettings) -> list[float]:
    # WhisperNoSpeechDetection: P(<|nocaptions|>) at the <|startoftranscript|> position.
    return logits_at_sot.float().softmax(-1)[:, s.no_timestamps_token_id - 1].tolist()


def decode_greedy(model, encoder_out: torch.Tensor, prompt: torch.Tensor, s: GenerationSettings,
                  rules: LogitRules, max_new: int, sot_index: int, temperature: float = 0.0,
                  generator: torch.Generator | None = None, should_stop: Callable[[], bool] | None = None,
                  ) -> list[WindowResult]:
    """Greedy (temperature 0) or sampled decoding of one window for every row of `prompt`."""
    decoder = model.decoder
    rows = prompt.shape[0]
    cache = decoder.new_cache(encoder_out, prompt.shape[1] + max_new)
    logits = decoder(prompt, cache, logits_at=[sot_index, -1])
    no_speech = _no_speech_prob(logits[:, 0], s)
    generated: list[list[int]] = [[] for _ in range(rows)]
    logprobs: list[list[float]] = [[] for _ in range(rows)]
    done = [False] * rows
    # Greedy steps after the first read the projection through the verified head: the same
    # choices and log-probabilities as float32 logits at half the bytes.
    verified = decoder.verified_head if temperature == 0 else None
    scores = rules(logits[:, 1].float(), generated)
    for _ in range(max_new):
        if temperature > 0:
            probs = F.softmax(scores / temperature, dim=-1)
            next_tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            next_tokens = scores.argmax(-1)
        # log_softmax, as transformers' _retrieve_avg_logprobs does; torch.logsumexp over the
        # vocabulary is several unfused passes, much slower than the fused log_softmax kernel.
        chosen = F.log_softmax(scores, dim=-1).gather(-1, next_tokens[:, None])[:, 0].tolist()
        ids = next_tokens.tolist()
        for r in range(rows):
            if done[r]:
                ids[r] = s.pad_token_id
                continue
            generated[r].append(ids[r])
            logprobs[r].append(chosen[r])
            done[r] = ids[r] == s.eos_token_id
        if all(done) or (should_stop is not None and should_stop()):
            break
        compute.yield_point()  # a window holds the lane for ~0.3 s: let short calls through
        h = decoder.hidden(torch.tensor(ids, device=prompt.device)[:, None], cache)[:, -1]
        if verified is not None:
            scores = rules.timestamp_choice(
                verified.scores(h, lambda x: rules.mask(x, generated), decoder.proj_out))
        else:
            scores = rules(decoder.proj_out(h).float(), generated)
    return [WindowResult(generated[r], logprobs[r], no_speech[r]) for r in range(rows)]


def decode_beam(model, encoder_out: torch.Tensor, prompt: torch.Tensor, s: GenerationSettings,
                rules: LogitRules, max_new: int, sot_index: int, num_beams: int,
                length_penalty: float = 1.0, should_stop: Callable[[], bool] | None = None) -> list[WindowResult]:
    """Beam search per row, as transformers' GenerationMixin._beam_search does it (early_stopping
    False): processors act on log-probabilities (not renormalised), 2 x beams candidates per
    step, a candidate ending in eos (or at max length) among the top `num_beams` becomes a
    finished hypothesis scored sum / generated_length ** length_penalty, and the search stops
    once no running beam can beat the worst of `num_beams` finished ones."""
    results = []
    decoder = model.decoder
    device = prompt.device
    keep = 2 * num_beams
    top_mask = torch.arange(keep, device=device) < num_beams
    for r in range(prompt.shape[0]):
        enc = encoder_out[r:r + 1].expand(num_beams, -1, -1)
        plen = prompt.shape[1]
        cache = decoder.new_cache(enc, plen + max_new)
        logits = decoder(prompt[r:r + 1].expand(num_beams, -1).contiguous(), cache, logits_at=[sot_index, -1])
        no_speech = _no_speech_prob(logits[:1, 0], s)[0]
        logits = logits[:, 1]
        running: list[list[int]] = [[] for _ in range(num_beams)]
        running_lps: list[list[float]] = [[] for _ in range(num_beams)]
        running_scores = torch.full((num_beams,), -1e9, device=device)
        running_scores[0] = 0.0
        fin_scores = torch.full((num_beams,), -1e9, device=device)
        fin_seqs: list[tuple[list[int], list[float]]] = [([], []) for _ in range(num_beams)]
        fin_done = torch.zeros(num_beams, dtype=torch.bool, device=device)
        unsatisfied = True
        step = 0
        while True:
            lp = rules(F.log_softmax(logits.float(), dim=-1), running)
            vocab = lp.shape[-1]
            top_scores, top_idx = (lp + running_scores[:, None]).view(-1).topk(keep)
            origin, tokens = top_idx // vocab, top_idx % vocab
            hits = (tokens == s.eos_token_id) | (step + 1 >= max_new)
            cand = [(running[b] + [t], running_lps[b] + [lp[b, t].item()])
                    for b, t in zip(origin.tolist(), tokens.tolist())]
            run_scores = top_scores + hits.float() * -1e9
            nxt = run_scores.topk(num_beams).indices
            norm = top_scores / ((step + 1) ** length_penalty)
            norm = norm + (0.0 if unsatisfied else -1e9) + (~(hits & top_mask)).float() * -1e9
            merged = torch.cat([fin_scores, norm])
            best = merged.topk(num_beams).indices
            fin_seqs = [fin_seqs[i] if i < num_beams else cand[i - num_beams] for i in best.tolist()]
            fin_done = torch.cat([fin_done, hits & top_mask])[best]
            fin_scores = merged[best]
            running = [cand[i][0] for i in nxt.tolist()]
            running_lps = [cand[i][1] for i in nxt.tolist()]
            running_scores = run_scores[nxt]
            step += 1
            best_running = running_scores[0] / (step ** length_penalty)
            worst = torch.where(fin_done, fin_scores.min(), torch.tensor(-1e9, device=device))
            unsatisfied = unsatisfied and bool((best_running > worst).any())
            if not unsatisfied or bool(hits.all()) or (should_stop is not None and should_stop()):
                break
            cache.reorder(origin[nxt])
            compute.yield_point()
            logits = decoder(torch.tensor([seq[-1] for seq in running], device=device)[:, None], cache)[:, -1]
        seq, seq_lp = fin_seqs[0]
        if not seq:  # nothing finished (stopped early): the best running beam
            seq, seq_lp = running[0], running_lps[0]
        results.append(WindowResult(seq, seq_lp, no_speech, sum_logprob=float(fin_scores[0])))
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


@dataclass
class Segment:
    """A decoded segment with absolute times (seconds)."""

    start: float
    end: float
    tokens: list[int]
    avg_logprob: float
    no_speech_prob: float
    temperature: float
    compression_ratio: float
    token_times: list[float] | None = None  # end time of each token, for word timings
    token_probs: list[float] | None = None  # probability of each token, for word probabilities
    time_offset: float = 0.0  # where the window its timestamp tokens count from begins


def _retrieve_segments(seq: list[int], tb: int, time_offset: float, seek_num_frames: int,
                       extra: dict) -> tuple[list[Segment], int, list[tuple[int, int]]]:
    """generation_whisper._retrieve_segment -> (segments, frames consumed, token index ranges)."""
    is_ts = [t >= tb for t in seq]
    single_ending = is_ts[-2:] == [False, True]
    cuts = [i + 1 for i in range(len(is_ts) - 1) if is_ts[i] and is_ts[i + 1]]
    segments, ranges = [], []
    if cuts:
        if single_ending:
            cuts.append(len(seq))
        else:
            cuts[-1] += 1
        last = 0
        for i, cut in enumerate(cuts):
            part = seq[last:cut]
            end_index = -1 if (i < len(cuts) - 1 or single_ending) else -2
            segments.append(Segment(start=time_offset + (part[0] - tb) * TIME_PRECISION,
                                    end=time_offset + (part[end_index] - tb) * TIME_PRECISION, tokens=part,
                                    time_offset=time_offset, **extra))
            ranges.append((last, cut))
            last = cut
        consumed = seek_num_frames if single_ending else (seq[last - 2] - tb) * INPUT_STRIDE
    else:
        stamps = [t for t in seq if t >= tb]
        last_pos = int(seek_num_frames * FRAME_SECONDS / TIME_PRECISION)
        if stamps and stamps[-1] != tb:
            last_pos = stamps[-1] - tb
        segments.append(Segment(start=time_offset, end=time_offset + last_pos * TIME_PRECISION, tokens=seq,
                                time_offset=time_offset, **extra))
        ranges.append((0, len(seq)))
        consumed = seek_num_frames
    return segments, consumed, ranges


def generate(model, features: torch.Tensor, num_frames: list[int], s: GenerationSettings,
             tok: WhisperTokenizer, opts: DecodeOptions, *, should_stop: Callable[[], bool] | None = None,
             on_language: Callable[[list[int | None], torch.Tensor | None], None] | None = None,
             ) -> Iterator[tuple[int, list[Segment]]]:
    """The seek loop of WhisperGenerationMixin.generate for rows of log-mel `features`
    [B, n_mels, frames] with `num_frames` real frames each. Yields (row, new segments) after
    every decoded window, so callers can stream; windows of several rows decode as one batch
    when their prompts have equal length."""
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
    rules = LogitRules(s, vocab, device, opts.return_timestamps)
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
        # Windows go through the encoder a few at a time: its 1500x1500 attention maps are
        # the largest activations (B x heads x 9 MB), and bigger batches do not run faster.
        encoder_out = torch.cat([model.encoder(torch.cat(windows[k:k + ENCODER_BATCH]).to(dtype),
                                               after_layer=compute.yield_point)
                                 for k in range(0, len(windows), ENCODER_BATCH)])
        if starts is None:  # language detection on the first window, as generate() does
            probs = language_probabilities(model, encoder_out, s) if s.lang_to_id and opts.language is None \
                and s.is_multilingual else None
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
        results = _decode_with_fallback(model, encoder_out, prompts, [starts[r] for r in rows], s, rules, opts,
                                        vocab, generator, should_stop)
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
            segments, consumed, ranges = _retrieve_segments(seq, tb, time_offset, n, extra) if seq else ([], n, [])
            if opts.word_timestamps and seq and s.alignment_heads:
                times, probs = token_times(model, encoder_out[i:i + 1], prompts[i], res.tokens, s,
                                           num_frames=min(num_frames[r] - seek[r], N_FRAMES) if num_frames[r] else None,
                                           crop_twice=uniform_frames)
                p = len(prompts[i])
                for seg, (a, b) in zip(segments, ranges):
                    seg.token_times = [time_offset + t for t in times[p + a:p + b]]
                    seg.token_probs = probs[p + a:p + b]
            seek[r] += consumed
            prev_tokens[r].extend(seg.tokens for seg in segments)
            yield r, segments


def _decode_with_fallback(model, encoder_out, prompts, starts, s, rules, opts, vocab, generator, should_stop):
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
            if temperature > 0 or opts.num_beams <= 1:
                res = decode_greedy(model, enc, prompt, s, rules, max_new, sot_index, temperature, generator, should_stop)
            else:
                res = decode_beam(model, enc, prompt, s, rules, max_new, sot_index, opts.num_beams,
                                  opts.length_penalty, should_stop)
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


# --- word-level times: cross-attention of the alignment heads + DTW ---

def median_filter(x: torch.Tensor, width: int) -> torch.Tensor:
    """generation_whisper._median_filter along the last dimension."""
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    x = F.pad(x, (pad, pad, 0, 0), mode="reflect")
    return x.unfold(-1, width, 1).sort()[0][..., pad]


def dynamic_time_warping(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """generation_whisper._dynamic_time_warping (same tie-breaking), one column at a time."""
    n, m = matrix.shape
    cost = np.full((n + 1, m + 1), np.inf, dtype=np.float32)
    trace = -np.ones((n + 1, m + 1), dtype=np.float32)
    cost[0, 0] = 0
    for j in range(1, m + 1):
        for i in range(1, n + 1):
            c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
            if c0 < c1 and c0 < c2:
                c, t = c0, 0
            elif c1 < c0 and c1 < c2:
                c, t = c1, 1
            else:
                c, t = c2, 2
            cost[i, j] = matrix[i - 1, j - 1] + c
            trace[i, j] = t
    i, j = n, m
    trace[0, :] = 2
    trace[:, 0] = 1
    text, time = [], []
    while i > 0 or j > 0:
        text.append(i - 1)
        time.append(j - 1)
        t = trace[i, j]
        if t == 0:
            i, j = i - 1, j - 1
        elif t == 1:
            i -= 1
        else:
            j -= 1
    return np.array(text)[::-1], np.array(time)[::-1]


def token_times(model, encoder_out: torch.Tensor, prompt: list[int], generated: list[int],
                s: GenerationSettings, num_frames: int | None,
                crop_twice: bool = False) -> tuple[list[float], list[float]]:
    """generation_whisper._extract_token_timestamps for one row: a time (s, window-relative) per
    position of prompt + generated (prompt positions are 0); and, per position, the token's
    probability in the same teacher-forced pass, as openai-whisper's timing.find_alignment
    (and faster-whisper) compute it: softmax over the text vocabulary (ids below <|endoftext|>),
    the probability of the token that was decoded (0 for the prompt and special tokens)."""
    tokens = torch.tensor([prompt + generated[:-1]], device=encoder_out.device)
    attentions, logits = model.decoder.cross_attentions(tokens, encoder_out)
    text_probs = logits[0, len(prompt) - 1:, : s.eos_token_id].float().softmax(dim=-1)
    probs = [0.0] * len(prompt) + [float(text_probs[k, t]) if t < s.eos_token_id else 0.0
                                   for k, t in enumerate(generated)]
    weights = torch.stack([attentions[layer][0, head] for layer, head in s.alignment_heads]).float()
    if num_frames is not None:
        weights = weights[..., : num_frames // 2]
        if crop_twice:
            # _extract_token_timestamps slices [..., :num_frames // 2] for a batch whose rows share
            # one count and again in its per-row loop. Only a window that starts past the end of
            # the audio (a model predicting timestamps beyond it) has a negative count, and a
            # negative slice drops frames from the end each time: the second slice matters then.
            weights = weights[..., : num_frames // 2]
    weights = weights[:, len(prompt):, :]  # [heads, generated - 1, frames]
    out = [0.0] * len(prompt)
    if weights.shape[1] == 0:
        return out + [0.0] * len(generated), probs
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
    weights = median_filter((weights - mean) / std, s.median_filter_width).mean(dim=0)
    text_idx, time_idx = dynamic_time_warping(-weights.cpu().double().numpy())
    jumps = np.pad(np.diff(text_idx), (1, 0), constant_values=1).astype(bool)
    jump_times = (time_idx[jumps] * TIME_PRECISION).tolist()
    return out + jump_times + [jump_times[-1]], probs
