"""Choosing the next token and turning tokens into text, per sequence.

- `GenerationParams.from_options`: request options -> validated parameters (InvalidParameter
  for out-of-range values and invalid combinations, before any work starts).
- Logits processors and warpers with transformers' semantics and order
  (transformers/generation/utils.py GenerationMixin._get_logits_processor): repetition
  penalty, no-repeat n-gram, min new tokens; then, when sampling, temperature, top-k, top-p,
  typical-p. Sampling is torch.multinomial on softmax(scores) with a per-sequence
  torch.Generator, which draws exactly as transformers' global-RNG draw does after
  torch.manual_seed(seed) for one sequence.
  Where the rule differs from transformers (documented, tested where equal):
  * num_return_sequences > 1: transformers draws every row from the one global generator in a
    single multinomial call; we seed sequence i with seed + i, so that each sequence is
    reproducible on its own and independent of which other requests share its decoding steps.
    A sequence equals transformers' only for num_return_sequences = 1 (and for one prompt).
  * stop sequences: transformers' `stop_strings` keeps the stop string in the output; our
    contract ends the text before it.
  * logprobs report the model's distribution (log_softmax of the raw logits), not the
    penalised/warped scores that were sampled from.
- `TextStream`: incremental detokenization (never half a UTF-8 character, never text that a
  later token changes), tokenizer clean-up, and stop sequences that may span tokens (text that
  could still become a stop sequence is held back; the stop sequence itself is never emitted).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..errors import InvalidParameter

# Caps that keep one request's cost bounded; beyond them a request is rejected up front.
MAX_RETURN_SEQUENCES = 16
MAX_TOP_LOGPROBS = 20
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    seed: int = 0
    num_return_sequences: int = 1
    return_full_text: bool = True
    logprobs: int = 0
    return_logprobs: bool = False
    eos_token_ids: tuple[int, ...] = field(default=())

    @classmethod
    def from_options(cls, options: dict[str, Any], *, eos_token_ids: Sequence[int], max_positions: int) -> "GenerationParams":
        """Validates merged options (defaults + request) the way transformers would refuse them."""
        def get(name, kind, default):
            value = options.get(name)
            if value is None:
                return default
            try:
                return kind(value)
            except (TypeError, ValueError):
                raise InvalidParameter(f"{name} must be a {kind.__name__}, got {value!r}") from None

        max_new = get("max_new_tokens", int, 256)
        if not 1 <= max_new <= max_positions:
            raise InvalidParameter(f"max_new_tokens must be between 1 and the model's context length "
                                   f"{max_positions}, got {max_new}")
        min_new = get("min_new_tokens", int, 0)
        if not 0 <= min_new <= max_new:
            raise InvalidParameter(f"min_new_tokens must be between 0 and max_new_tokens ({max_new}), got {min_new}")
        do_sample = get("do_sample", bool, False)
        temperature = get("temperature", float, 1.0)
        if not math.isfinite(temperature) or temperature < 0:
            raise InvalidParameter(f"temperature must be a finite number >= 0, got {temperature}")
        if do_sample and temperature == 0:
            raise InvalidParameter("temperature 0 with do_sample is undefined; for greedy decoding set do_sample=false")
        top_k = get("top_k", int, 50)
        if top_k < 0:
            raise InvalidParameter(f"top_k must be >= 0 (0 disables it), got {top_k}")
        top_p = get("top_p", float, 1.0)
        if not (0 < top_p <= 1):
            raise InvalidParameter(f"top_p must be in (0, 1], got {top_p}")
        typical_p = get("typical_p", float, 1.0)
        if not (0 < typical_p <= 1):
            raise InvalidParameter(f"typical_p must be in (0, 1], got {typical_p}")
        penalty = get("repetition_penalty", float, 1.0)
        if not math.isfinite(penalty) or penalty <= 0:
            raise InvalidParameter(f"repetition_penalty must be a finite number > 0, got {penalty}")
        ngram = get("no_repeat_ngram_size", int, 0)
        if ngram < 0:
            raise InvalidParameter(f"no_repeat_ngram_size must be >= 0, got {ngram}")
        stop = tuple(options.get("stop") or ())
        if len(stop) > MAX_STOP_SEQUENCES:
            raise InvalidParameter(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stop)}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise InvalidParameter("stop sequences must be non-empty strings")
            if len(s) > MAX_STOP_CHARS:
                raise InvalidParameter(f"a stop sequence may have at most {MAX_STOP_CHARS} characters")
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidParameter(f"stop sequence {s!r} is not valid UTF-8") from None
        n = get("num_return_sequences", int, 1)
        if not 1 <= n <= MAX_RETURN_SEQUENCES:
            raise InvalidParameter(f"num_return_sequences must be between 1 and {MAX_RETURN_SEQUENCES}, got {n}")
        if n > 1 and not do_sample:
            raise InvalidParameter("num_return_sequences > 1 needs do_sample=true: greedy decoding would "
                                   "return the same sequence each time")
        logprobs = get("logprobs", int, 0)
        if not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidParameter(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {logprobs}")
        seed = options.get("seed")
        if seed is not None and not 0 <= int(seed) < 2 ** 64:
            raise InvalidParameter(f"seed must be in [0, 2^64), got {seed}")
        # A seed means something only for sampling: greedy decoding reports 0, so that a
        # caller never mistakes a number the output did not depend on for one it did.
        if not do_sample:
            seed = 0
        elif seed is None:
            seed = random.getrandbits(63)
        seed = int(seed)
        return cls(max_new_tokens=max_new, min_new_tokens=min_new, do_sample=do_sample, temperature=temperature,
                   top_k=top_k, top_p=top_p, typical_p=typical_p, repetition_penalty=penalty,
                   no_repeat_ngram_size=ngram, stop=stop, ignore_eos=get("ignore_eos", bool, False), seed=seed,
                   num_return_sequences=n, return_full_text=get("return_full_text", bool, True),
                   logprobs=logprobs, return_logprobs=get("return_logprobs", bool, False) or logprobs > 0,
                   eos_token_ids=tuple(eos_token_ids))


# ---- logits processors: (input_ids [1, L], scores [1, V]) -> scores, as transformers' ----------

def repetition_penalty(input_ids, scores, penalty):
    """RepetitionPenaltyLogitsProcessor (prompt included, as in transformers without padding)."""
    score = torch.gather(scores, 1, input_ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return scores.scatter(1, input_ids, score)


def no_repeat_ngram(input_ids, scores, n):
    """NoRepeatNGramLogitsProcessor: ban tokens that would complete an n-gram seen before."""
    cur_len = input_ids.shape[-1]
    if cur_len < n:
        return scores
    prefix = input_ids[:, cur_len + 1 - n:]
    windows = input_ids.unfold(dimension=1, size=n, step=1)
    matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)
    vocab = scores.shape[-1]
    banned = scores.new_zeros((scores.shape[0], vocab + 1), dtype=torch.bool)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
    return scores.masked_fill(banned[:, :vocab], -float("inf"))


def min_new_tokens(scores, eos_ids: Sequence[int], generated: int, minimum: int):
    """MinNewTokensLengthLogitsProcessor: no end-of-sequence before `minimum` new tokens."""
    if generated < minimum and eos_ids:
        scores = scores.clone()
        scores[:, [i for i in eos_ids if i < scores.shape[-1]]] = -math.inf
    return scores


def top_k_filter(scores, k):
    """TopKLogitsWarper (min_tokens_to_keep=1)."""
    k = min(k, scores.size(-1))
    return scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], -float("inf"))


def top_p_filter(scores, p):
    """TopPLogitsWarper (min_tokens_to_keep=1)."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - p)
    remove[..., -1:] = 0
    remove = remove.scatter(1, sorted_indices, remove)
    return scores.masked_fill(remove, -float("inf"))


def typical_filter(scores, mass):
    """TypicalLogitsWarper (min_tokens_to_keep=1)."""
    normalized = torch.nn.functional.log_softmax(scores, dim=-1)
    p = torch.exp(normalized)
    ent = -(normalized * p).nansum(-1, keepdim=True)
    shifted = torch.abs((-normalized) - ent)
    sorted_scores, sorted_indices = torch.sort(shifted, descending=False)
    sorted_logits = scores.gather(-1, sorted_indices)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=1)
    last.clamp_(max=sorted_scores.shape[-1] - 1)
    remove = sorted_scores > sorted_scores.gather(1, last.view(-1, 1))
    remove[..., :1] = 0
    remove = remove.scatter(1, sorted_indices, remove)
    return scores.masked_fill(remove, -float("inf"))


@dataclass
class Choice:
    token: int
    logprob: float = 0.0
    top: list[tuple[int, float]] = field(default_factory=list)


class TokenChooser:
    """One sequence's next-token rule: processors, warpers and a seeded generator."""

    def __init__(self, params: GenerationParams, seed: int, device: torch.device | str = "cpu"):
        self.params = params
        self.generator = None
        if params.do_sample:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed)

    def choose(self, logits: torch.Tensor, input_ids: torch.Tensor, generated: int) -> Choice:
        """logits [1, V] float32 of the last position; input_ids [1, L] prompt + generated so far."""
        p = self.params
        scores = logits
        if p.repetition_penalty != 1.0:
            scores = repetition_penalty(input_ids, scores, p.repetition_penalty)
        if p.no_repeat_ngram_size > 0:
            scores = no_repeat_ngram(input_ids, scores, p.no_repeat_ngram_size)
        if p.min_new_tokens > 0 and not p.ignore_eos:
            scores = min_new_tokens(scores, p.eos_token_ids, generated, p.min_new_tokens)
        if p.do_sample:
            if p.temperature != 1.0:
                scores = scores / p.temperature
            if p.top_k:
                scores = top_k_filter(scores, p.top_k)
            if p.top_p < 1.0:
                scores = top_p_filter(scores, p.top_p)
            if p.typical_p < 1.0:
                scores = typical_filter(scores, p.typical_p)
            probs = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs, num_samples=1, generator=self.generator)[0, 0])
        else:
            token = int(torch.argmax(scores, dim=-1)[0])
        choice = Choice(token)
        if p.return_logprobs:
            # The model's own distribution (before penalties and warpers), as OpenAI-style APIs report.
            logp = torch.log_softmax(logits[0].float(), dim=-1)
            choice.logprob = float(logp[token])
            if p.logprobs:
                values, ids = torch.topk(logp, min(p.logprobs, logp.shape[-1]))
                choice.top = list(zip(ids.tolist(), values.tolist()))
        return choice


# ---- text --------------------------------------------------------------------------------

# PreTrainedTokenizerBase.clean_up_tokenization: each pattern starts with a space.
_CLEANUPS = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


def clean_up_tokenization(text: str) -> str:
    for before, after in _CLEANUPS:
        text = text.replace(before, after)
    return text


def byte_fallback_tokens(tokenizer) -> frozenset[int]:
    """Ids of the <0xNN> tokens of a tokenizer whose BPE model uses byte fallback (Llama, Mistral)."""
    # Asked of the model and by name (512 lookups): serialising a 262k-token tokenizer to JSON
    # to scan its vocabulary took 4 s.
    if not getattr(tokenizer.model, "byte_fallback", False):
        return frozenset()
    names = {f"<0x{byte:02X}>" for byte in range(256)} | {f"<0x{byte:02x}>" for byte in range(256)}
    ids = (tokenizer.token_to_id(name) for name in names)
    return frozenset(i for i in ids if i is not None)


def _held_suffix(text: str, patterns: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `patterns`."""
    best = 0
    for pattern in patterns:
        for n in range(min(len(pattern) - 1, len(text)), best, -1):
            if pattern.startswith(text[-n:]):
                best = n
                break
    return best


class IncrementalDetokenizer:
    """Token ids -> text deltas (text-generation-inference's prefix/read offsets): decoding a
    short window with some context keeps byte-level and metaspace decoders consistent, and a
    window ending in U+FFFD (half a UTF-8 character) waits for the next token."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True, byte_tokens: frozenset[int] = frozenset()):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        # ByteFallback decodes a run of <0xNN> tokens together, and a run that is not valid
        # UTF-8 becomes one U+FFFD per byte, so a later byte can rewrite the run's earlier text:
        # nothing from a run is released until a token outside the run follows.
        self.byte_tokens = byte_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token: int) -> str:
        self.ids.append(token)
        if token in self.byte_tokens:
            return ""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """What is left at the end (may end in U+FFFD if the model stopped mid-character)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""


class TextStream:
    """Released text of one sequence. `push` returns (text released by this token, stopped);
    released text never changes afterwards, so streamed pieces concatenate to the final text."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), clean_up_spaces: bool = False,
                 byte_tokens: frozenset[int] = frozenset()):
        self.detok = IncrementalDetokenizer(tokenizer, byte_tokens=byte_tokens)
        self.stop = tuple(stop)
        self.clean_up = clean_up_spaces
        self.raw_pending = ""  # decoded, not yet cleaned (may start a clean-up pattern)
        self.pending = ""  # cleaned, not yet released (may start a stop sequence)
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        return self._advance(self.detok.push(token), final=False)

    def finish(self) -> str:
        """Releases held text once no token follows (end of sequence or length)."""
        if self.stopped:
            return ""
        return self._advance(self.detok.flush(), final=True)[0]

    def _advance(self, delta: str, final: bool) -> tuple[str, bool]:
        self.raw_pending += delta
        hold = 0 if final or not self.clean_up else _held_suffix(self.raw_pending, [p for p, _ in _CLEANUPS])
        ready = self.raw_pending[:len(self.raw_pending) - hold]
        self.raw_pending = self.raw_pending[len(ready):]
        self.pending += clean_up_tokenization(ready) if self.clean_up else ready
        cut = min((i for i in (self.pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            released, self.stopped = self.pending[:cut], True
            self.pending = self.raw_pending = ""
        else:
            keep = 0 if final else _held_suffix(self.pending, self.stop)
            released = self.pending[:len(self.pending) - keep]
            self.pending = self.pending[len(released):]
        self.text += released
        return released, self.stopped
