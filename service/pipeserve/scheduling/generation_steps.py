"""Running the model for the generation engine: one prompt chunk of a group of joining requests,
one decoding step of every decoding sequence, and each sequence's next-token choice from the
logits that step produced.

A prompt is passed `prefill_chunk` tokens at a time (one chunk per engine iteration, so that the
running streams are not stalled by a long prompt), one row per request; when the last chunk is
through, a request's extra sequences (num_return_sequences) copy its first sequence's cache. A
decoding step feeds each sequence its last token and writes one key/value per layer at that
sequence's own position. The scores of a decoding step, and of a prompt's last position, come
from the model's float32 head, or for rows whose choice is a plain argmax from its verified
head when it has one (layers/int8_head.py, layers/verified_head.py: the float32 argmax at a
quarter or half of the head's bytes); a decoding step whose rows are all plain argmax rows
takes its tokens from a verified head that can choose (`decode_argmax`: no [B, V] scores to
fill and scan); a prompt's earlier chunks run no head at all. The time each pass took is
charged to the requests it served (`compute_s`, `max_batch`).

The model is any causal LM with the engine's contract (models/causal_lm.py CausalLM: `hidden`,
`lm_head`, forward with `last_only`, `max_positions`, optional `verified_head`).
"""
from __future__ import annotations

import math
import time
from typing import Callable, TypeVar

import torch

from ..checkpoints.weights import module_device
from ..layers.kv_cache import KVCache
from ..layers.screen_search import block_maxima
from ..layers.serial import SerialSection
from .generation import Choice, GenerationParams, TokenChooser
from .generation_requests import RequestHandle, Sequence

RECENT_BATCH_SIZES = 256

# Scores per block of first_argmax: the vectorized amax of 4096 float32 scores (16 KiB, in L1/L2)
# per block, then one block per row searched with indices.
ARGMAX_BLOCK = 4096


def first_argmax(scores: torch.Tensor) -> list[int]:
    """Each row's index of its first maximum, exactly torch.max(dim=-1).indices, for scores
    [B, V] with contiguous rows.

    max with indices runs a scalar compare loop over every score; amax is vectorized. So: the
    maximum of each block of ARGMAX_BLOCK scores (amax), the first block that holds its row's
    maximum, and max with indices over that block alone; on the calling thread (layers/serial.py:
    a reduction's fork and join cost more than the second core gives here). Measured on our
    2-core Xeon (load ~4, best of 9): [1, 262144] 108 us (torch.max) -> 52, [16, 262144] 6.6-12 ms
    -> 0.8-1.2 (the same blocks split over two threads: 14-25 ms). A row with a NaN (no block
    equals its maximum) takes torch.max over the whole row, as do vocabularies under two blocks."""
    with SerialSection(True):
        return _first_argmax(scores)


def _first_argmax(scores: torch.Tensor) -> list[int]:
    B, V = scores.shape
    n = V // ARGMAX_BLOCK
    if n < 2 or scores.stride(-1) != 1:
        return scores.max(dim=-1).indices.tolist()
    blocks = scores[:, :n * ARGMAX_BLOCK].unflatten(1, (n, ARGMAX_BLOCK))  # [B, n, block], a view
    block_max = block_maxima(scores, ARGMAX_BLOCK)  # [B, n], or [B, n + 1] with a shorter tail block
    tail = scores[:, n * ARGMAX_BLOCK:] if n * ARGMAX_BLOCK < V else None
    hit = block_max == block_max.amax(-1, keepdim=True)
    if not bool(hit.any(-1).all()):  # a NaN maximum
        return scores.max(dim=-1).indices.tolist()
    first = hit.byte().argmax(-1)  # the first block holding the maximum (argmax: the first of ties)
    full = first.clamp(max=n - 1)
    index = blocks[torch.arange(B, device=scores.device), full].max(dim=-1).indices + full * ARGMAX_BLOCK
    if tail is not None:
        index = torch.where(first == n, tail.max(dim=-1).indices + n * ARGMAX_BLOCK, index)
    return index.tolist()


def argmax_only(seq: Sequence) -> bool:
    """The sequence's next token is the argmax of its logits, with at most the end-of-sequence
    tokens masked (min_new_tokens), and nothing else reads them: greedy, no penalty or n-gram
    rule, no log-probabilities."""
    p = seq.params
    return (not p.do_sample and p.repetition_penalty == 1.0 and p.no_repeat_ngram_size == 0
            and not p.return_logprobs)


def eos_masks(seqs: list[Sequence], vocab: int) -> Callable[[torch.Tensor], None]:
    """The min_new_tokens rule of these rows, applied to screened scores before the verified
    head picks the tokens to recompute (the chooser applies it again: idempotent)."""
    rows = []
    for k, seq in enumerate(seqs):
        p = seq.params
        if p.min_new_tokens > 0 and not p.ignore_eos and seq.generated < p.min_new_tokens:
            rows.append((k, [i for i in p.eos_token_ids if i < vocab]))

    def mask(scores: torch.Tensor) -> None:
        for k, ids in rows:
            scores[k, ids] = -math.inf
    mask.entries = rows  # what it masks, for a head that screens in its own order (layers/int8_head.py)
    return mask


T = TypeVar("T")  # what a decoding step returns: scores, or tokens


class StepRunner:
    """Model passes over the engine's KV cache. Called by the engine's thread only."""

    def __init__(self, model, cache: KVCache, *, prefill_chunk: int = 512):
        self.model = model
        self.cache = cache
        # Prompt tokens per row passed in one engine iteration.
        self.prefill_chunk = prefill_chunk
        self.device = next(model.parameters()).device
        self.steps = 0  # decode steps run (for tests and metrics)
        self.batch_sizes: list[int] = []  # recent decode batch sizes

    def chooser(self, params: GenerationParams, index: int) -> TokenChooser:
        """Sequence `index`'s next-token rule; its sampler is seeded with seed + index, on the
        device the logits come from."""
        return TokenChooser(params, (params.seed + index) % 2 ** 64, module_device(self.model.lm_head))

    def prefill(self, group: list[list[Sequence]]) -> torch.Tensor | None:
        """Passes the next chunk of the group's prompts (equal lengths; one list of sequences
        per request, whose first sequence carries the pass). Returns the last position's logits
        [requests, V] once the prompts are through, every sequence then decoding; else None."""
        firsts = [seqs[0] for seqs in group]
        done = self.cache.lengths[firsts[0].slot]
        prompt_len = len(firsts[0].handle.prompt_ids)
        end = min(prompt_len, done + self.prefill_chunk)
        started = time.perf_counter()
        ids = torch.tensor([s.handle.prompt_ids[done:end] for s in firsts], device=self.device)
        view = self.cache.view([s.slot for s in firsts], end - done)
        hidden = self.model.hidden(ids, view, last_only=True)[:, -1]  # [B, C]
        last = end == prompt_len
        # Only the last chunk's scores are read: the head (most of a small model's bytes) runs
        # once per prompt, through the verified head for plain greedy requests as in decode().
        logits = self._finish(self._scores(hidden, firsts)) if last else None  # [B, V]
        view.commit()
        self._charge({s.handle for s in firsts}, time.perf_counter() - started, len(group))
        if not last:
            return None
        for seqs in group:
            for seq in seqs[1:]:
                self.cache.copy_slot(seqs[0].slot, seq.slot)
            for seq in seqs:
                seq.decoding = True
        return logits

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One decoding step: each sequence's last token in, its next scores [B, V] float32 out."""
        return self._step(seqs, lambda hidden: self._finish(self._scores(hidden, seqs)))  # [B, V]

    def decode_argmax(self, seqs: list[Sequence]) -> list[int] | None:
        """One decoding step whose rows are all plain argmax rows (argmax_only), their tokens
        chosen by a verified head that can (layers/int8_head.py `choose`: the float32 argmax, the
        tokens decode + choose_all give) without the [B, V] scores; None, running nothing,
        otherwise."""
        head = getattr(self.model, "verified_head", None)
        if getattr(head, "choose", None) is None or not all(argmax_only(s) for s in seqs):
            return None
        mask = eos_masks(seqs, head.weight.shape[0])
        return self._step(seqs, lambda hidden: head.choose(hidden, mask, self.model.lm_head, self._finish).tolist())

    def _step(self, seqs: list[Sequence], read: Callable[[torch.Tensor], T]) -> T:
        """Each sequence's last token through the model; `read` turns the final hidden states
        [B, C] into the step's result."""
        started = time.perf_counter()
        ids = torch.tensor([[s.last] for s in seqs], device=self.device)
        view = self.cache.view([s.slot for s in seqs], 1)
        result = read(self.model.hidden(ids, view)[:, -1])
        view.commit()
        self.steps += 1
        self.batch_sizes = (self.batch_sizes + [len(seqs)])[-RECENT_BATCH_SIZES:]
        self._charge({s.handle for s in seqs}, time.perf_counter() - started, len(seqs))
        return result

    def choose(self, seq: Sequence, logits: torch.Tensor) -> Choice:
        """The sequence's next token from its logits [1, V] (penalties, warpers, sampling)."""
        params = seq.params
        needs_ids = params.repetition_penalty != 1.0 or params.no_repeat_ngram_size > 0
        input_ids = torch.tensor([seq.ids], device=logits.device) if needs_ids else None
        return seq.chooser.choose(logits, input_ids, seq.generated)

    def choose_all(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Choice]:
        """Every sequence's next token from a step's logits [B, V]: the rows whose choice is a
        plain argmax (argmax_only, min_new_tokens applied as a mask) take one batched argmax and
        one read of the results, instead of an argmax and a sync per row; the others go through
        their own chooser. The greedy rows of `logits` are masked in place (nothing else reads
        them)."""
        greedy = [i for i, seq in enumerate(seqs) if argmax_only(seq)]
        choices: list[Choice | None] = [None] * len(seqs)
        if greedy:
            every = len(greedy) == len(seqs)
            rows = logits if every else logits[greedy]
            eos_masks([seqs[i] for i in greedy], rows.shape[-1])(rows)
            # the first maximum of each row, as argmax, by blocks on one thread (first_argmax: 2-8x
            # faster than max's indices, themselves 1.5-3x faster than torch.argmax, over 262k scores)
            for i, token in zip(greedy, first_argmax(rows)):
                choices[i] = Choice(token)
        for i, seq in enumerate(seqs):
            if choices[i] is None:
                choices[i] = self.choose(seq, logits[i:i + 1])
        return choices

    def _scores(self, hidden: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The step's scores [B, V] float32 from the final hidden states [B, C]: rows whose
        next token is a plain argmax go through the model's verified head when it has one, the
        others through the float32 head."""
        head = getattr(self.model, "verified_head", None)
        screened = [i for i, seq in enumerate(seqs) if head is not None and argmax_only(seq)]
        if not screened:
            return self.model.lm_head(hidden).float()
        vocab = head.weight.shape[0]
        exact = sorted(set(range(len(seqs))) - set(screened))
        if not exact:
            return head.scores(hidden, eos_masks(seqs, vocab), self.model.lm_head)
        logits = torch.empty(len(seqs), vocab, device=hidden.device)
        logits[screened] = head.scores(hidden[screened], eos_masks([seqs[i] for i in screened], vocab),
                                       self.model.lm_head)
        logits[exact] = self.model.lm_head(hidden[exact]).float()
        return logits

    def _finish(self, logits: torch.Tensor) -> torch.Tensor:
        """The family's last word on the scores (Gemma's soft cap; models/causal_lm.py)."""
        finish = getattr(self.model, "finish_logits", None)
        return finish(logits) if finish is not None else logits

    @staticmethod
    def _charge(handles: set[RequestHandle], elapsed: float, batch: int) -> None:
        for handle in handles:
            handle.compute_s += elapsed
            handle.max_batch = max(handle.max_batch, batch)
