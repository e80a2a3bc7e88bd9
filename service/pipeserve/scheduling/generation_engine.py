"""Continuous batching for one causal LM: a thread that owns the model's KV cache and runs
decoding steps for every active sequence in one forward pass.

Between steps, queued requests join and finished or cancelled sequences leave at once,
freeing their cache slot. A joining request's prompt is passed through the model in chunks of
`prefill_chunk` tokens, one chunk per iteration between decoding steps (requests with prompts of
equal length that join together share those passes), then it decodes with the rest. Bounds: at most
`max_batch_size` sequences decode together, their reserved tokens (prompt + max_new_tokens)
stay under `max_batch_tokens`, and at most `max_queued` requests wait (QueueFull past that).
A cancelled request (client gone, deadline passed) is dropped before the next step.

Callers get a `RequestHandle`: iterate it synchronously (worker threads) or with `async for`
(grpc.aio servicers); events are TokenEvent per token and DoneEvent per sequence.
"""
from __future__ import annotations

import asyncio
import math
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..checkpoints.weights import module_device
from ..errors import InvalidInput, PipeserveError, QueueFull
from ..layers.kv_cache import KVCache
from . import compute
from .generation import GenerationParams, TextStream, TokenChooser, byte_fallback_tokens

log = logging.getLogger(__name__)

FINISH_LENGTH, FINISH_EOS, FINISH_STOP, FINISH_CANCELLED = "length", "eos_token", "stop_sequence", "cancelled"


@dataclass
class TokenEvent:
    index: int  # sequence index within the request
    token: int
    text: str
    logprob: float = 0.0
    special: bool = False
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class DoneEvent:
    index: int
    finish_reason: str
    generated_tokens: int
    text: str
    tokens: list[TokenEvent] = field(default_factory=list)


_END = object()


class RequestHandle:
    """A submitted request's event stream. Thread-safe; cancel() may come from any thread."""

    def __init__(self, prompt_ids: list[int], params: GenerationParams):
        self.prompt_ids = prompt_ids
        self.params = params
        self.cancelled = threading.Event()
        self.submitted_at = time.perf_counter()
        self.started_at: float | None = None
        self.compute_s = 0.0
        self.max_batch = 0
        try:
            self._loop = asyncio.get_running_loop()
            self._async_queue: asyncio.Queue | None = asyncio.Queue()
        except RuntimeError:
            self._loop, self._async_queue = None, None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # Events for an event-loop consumer are handed over in bunches: one loop wake-up per
        # bunch, not per token, when the loop is busier than the engine.
        self._lock = threading.Lock()
        self._pending: list[Any] = []
        self._wake_scheduled = False

    def cancel(self) -> None:
        self.cancelled.set()

    def _put(self, item: Any) -> None:
        if self._loop is None:
            self._queue.put(item)
            return
        with self._lock:
            self._pending.append(item)
            if self._wake_scheduled:
                return
            self._wake_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the caller's event loop is gone: nobody listens any more
            self.cancel()

    def _deliver(self) -> None:  # on the consumer's event loop
        with self._lock:
            items, self._pending, self._wake_scheduled = self._pending, [], False
        for item in items:
            self._async_queue.put_nowait(item)

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def __aiter__(self):
        return self._aiter()

    async def _aiter(self):
        while True:
            item = await self._async_queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


@dataclass
class _Sequence:
    handle: RequestHandle
    index: int
    slot: int
    chooser: TokenChooser
    text: TextStream
    ids: list[int]
    last: int = -1
    generated: int = 0
    reserved: int = 0
    tokens: list[TokenEvent] = field(default_factory=list)
    decoding: bool = False  # False while its prompt is still being passed through the model


def _argmax_only(seq: "_Sequence") -> bool:
    """The sequence's next token is the argmax of its logits, with at most the end-of-sequence
    tokens masked (min_new_tokens), and nothing else reads them: greedy, no penalty or n-gram
    rule, no log-probabilities."""
    p = seq.handle.params
    return (not p.do_sample and p.repetition_penalty == 1.0 and p.no_repeat_ngram_size == 0
            and not p.return_logprobs)


def _eos_masks(seqs: list["_Sequence"], vocab: int) -> Callable[[torch.Tensor], None]:
    """The min_new_tokens rule of these rows, applied to screened scores before the verified
    head picks the tokens to recompute (the chooser applies it again: idempotent)."""
    rows = []
    for k, seq in enumerate(seqs):
        p = seq.handle.params
        if p.min_new_tokens > 0 and not p.ignore_eos and seq.generated < p.min_new_tokens:
            rows.append((k, [i for i in p.eos_token_ids if i < vocab]))

    def mask(scores: torch.Tensor) -> None:
        for k, ids in rows:
            scores[k, ids] = -math.inf
    return mask


class GenerationEngine:
    def __init__(self, model, tokenizer, *, special_ids: set[int], clean_up_spaces: bool = False,
                 max_batch_size: int = 32, max_batch_tokens: int = 65536, max_queued: int = 256,
                 prefill_chunk: int = 512):
        self.model = model
        self.tokenizer = tokenizer
        self.special_ids = special_ids
        self.clean_up_spaces = clean_up_spaces
        self.byte_tokens = byte_fallback_tokens(tokenizer) if hasattr(tokenizer, "to_str") else frozenset()
        self.max_batch_size, self.max_batch_tokens, self.max_queued = max_batch_size, max_batch_tokens, max_queued
        # Prompt tokens per row passed in one engine iteration: a long prompt is passed in
        # chunks between decoding steps, so running streams are not stalled by it.
        self.prefill_chunk = prefill_chunk
        self._prefilling: list[list[list[_Sequence]]] = []  # groups of requests, equal prompt length
        self.device = next(model.parameters()).device
        self.cache = KVCache(model.num_layers, model.kv_heads, model.head_dim, model.max_positions,
                             dtype=model.cache_dtype(), devices=model.cache_devices(), max_slots=max_batch_size)
        self._waiting: deque[RequestHandle] = deque()
        self._active: list[_Sequence] = []
        self._reserved = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = 0  # decode steps run (for tests and metrics)
        self.batch_sizes: list[int] = []  # recent decode batch sizes

    # ---- public API -------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: GenerationParams) -> RequestHandle:
        if not prompt_ids:
            raise InvalidInput("the prompt is empty")
        need = self._reservation(len(prompt_ids), params) * params.num_return_sequences
        if need > self.max_batch_tokens or params.num_return_sequences > self.max_batch_size:
            raise InvalidInput(f"the request needs {need} tokens of cache; this model serves at most "
                               f"{self.max_batch_tokens} tokens at once (lower max_new_tokens or num_return_sequences)")
        handle = RequestHandle(prompt_ids, params)
        with self._cond:
            if self._closed:
                raise QueueFull("the generation engine is shut down")
            if len(self._waiting) >= self.max_queued:
                raise QueueFull(f"{self.max_queued} generation requests are already waiting for this model",
                                metadata={"limit": self.max_queued, "retry_after_ms": 500})
            self._waiting.append(handle)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
                self._thread.start()
            self._cond.notify()
        return handle

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def queued(self) -> int:
        return len(self._waiting)

    def active(self) -> int:
        return len(self._active)

    # ---- engine thread ----------------------------------------------------------------
    def _iteration(self) -> None:
        """Admits waiting requests, runs a prefill chunk and one decoding step."""
        self._drop_cancelled()
        self._admit()
        if self._prefilling:
            self._prefill_chunk()
        if any(s.decoding for s in self._active):
            self._step()

    def _reservation(self, prompt_len: int, params: GenerationParams) -> int:
        return min(prompt_len + params.max_new_tokens, self.model.max_positions)

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._closed and not self._waiting and not self._active:
                        self._cond.wait()
                    if self._closed:
                        break
                try:
                    compute.call(self._iteration)  # one compute-lane task per iteration
                except Exception as exc:  # a bug here must not leave callers waiting forever
                    log.exception("generation engine step failed")
                    for handle in {s.handle for s in self._active}:
                        self._fail([s for s in self._active if s.handle is handle], handle, exc)
        for seq in list(self._active):
            self._finish(seq, FINISH_CANCELLED)
        while self._waiting:
            self._waiting.popleft()._put(_END)

    def _drop_cancelled(self) -> None:
        for seq in list(self._active):
            if seq.handle.cancelled.is_set():
                self._finish(seq, FINISH_CANCELLED)

    def _admit(self) -> None:
        """Moves waiting requests into the batch while the bounds allow, then runs their prompt
        passes, one pass per group of equal prompt length (a crowd of similar requests
        arriving together shares one prompt pass as well)."""
        joined: list[list[_Sequence]] = []
        while True:
            with self._cond:
                if not self._waiting:
                    break
                handle = self._waiting[0]
                n = handle.params.num_return_sequences
                need = self._reservation(len(handle.prompt_ids), handle.params) * n
                if handle.cancelled.is_set():
                    self._waiting.popleft()
                    handle._put(_END)
                    continue
                if self._active and (len(self._active) + n > self.max_batch_size
                                     or self._reserved + need > self.max_batch_tokens):
                    break  # waits for sequences to leave
                self._waiting.popleft()
            try:
                joined.append(self._join(handle))
            except Exception as exc:  # one bad request must not stop the engine
                self._fail([s for s in self._active if s.handle is handle], handle, exc)
        groups: dict[int, list[list[_Sequence]]] = {}
        for seqs in joined:
            groups.setdefault(len(seqs[0].handle.prompt_ids), []).append(seqs)
        self._prefilling.extend(groups.values())

    def _join(self, handle: RequestHandle) -> list[_Sequence]:
        """Cache slots and decoding state for each of the request's sequences."""
        params = handle.params
        handle.started_at = time.perf_counter()
        reserve = self._reservation(len(handle.prompt_ids), params)
        seqs: list[_Sequence] = []
        for i in range(params.num_return_sequences):
            slot = self.cache.allocate()
            seq = _Sequence(handle, i, slot, TokenChooser(params, (params.seed + i) % 2 ** 64, self._logits_device()),
                            TextStream(self.tokenizer, params.stop, self.clean_up_spaces, self.byte_tokens),
                            list(handle.prompt_ids), reserved=reserve)
            seqs.append(seq)
            self._active.append(seq)
            self._reserved += reserve
        return seqs

    def _prefill_chunk(self) -> None:
        """Passes the next chunk of the first waiting group's prompts (one row per request;
        a request's extra sequences copy its first sequence's cache at the end)."""
        group = [seqs for seqs in self._prefilling[0] if seqs[0] in self._active]  # cancelled ones left
        if not group:
            self._prefilling.pop(0)
            return
        self._prefilling[0] = group
        firsts = [seqs[0] for seqs in group]
        done = self.cache.lengths[firsts[0].slot]
        prompt_len = len(firsts[0].handle.prompt_ids)
        end = min(prompt_len, done + self.prefill_chunk)
        started = time.perf_counter()
        try:
            ids = torch.tensor([s.handle.prompt_ids[done:end] for s in firsts], device=self.device)
            view = self.cache.view([s.slot for s in firsts], end - done)
            logits = self.model(ids, view, last_only=True)[:, -1]  # [B, V]
            view.commit()
        except Exception as exc:
            self._prefilling.pop(0)
            for seqs in group:
                self._fail([s for s in self._active if s.handle is seqs[0].handle], seqs[0].handle, exc)
            return
        elapsed = time.perf_counter() - started
        for seqs in group:
            seqs[0].handle.compute_s += elapsed
            seqs[0].handle.max_batch = max(seqs[0].handle.max_batch, len(group))
        if end < prompt_len:
            return
        self._prefilling.pop(0)
        for row, seqs in enumerate(group):
            for seq in seqs[1:]:
                self.cache.copy_slot(seqs[0].slot, seq.slot)
            for seq in seqs:
                seq.decoding = True
                self._advance(seq, logits[row:row + 1])

    def _step(self) -> None:
        # contiguous slots are read without a gather
        seqs = sorted((s for s in self._active if s.decoding), key=lambda s: s.slot)
        started = time.perf_counter()
        try:
            ids = torch.tensor([[s.last] for s in seqs], device=self.device)
            view = self.cache.view([s.slot for s in seqs], 1)
            logits = self._logits(self.model.hidden(ids, view)[:, -1], seqs)  # [B, V]
            view.commit()
        except Exception as exc:
            for handle in {s.handle for s in seqs}:
                self._fail([s for s in seqs if s.handle is handle], handle, exc)
            return
        elapsed = time.perf_counter() - started
        self.steps += 1
        self.batch_sizes = (self.batch_sizes + [len(seqs)])[-256:]
        for handle in {s.handle for s in seqs}:
            handle.compute_s += elapsed
            handle.max_batch = max(handle.max_batch, len(seqs))
        for i, seq in enumerate(seqs):
            if seq in self._active:
                self._advance(seq, logits[i:i + 1])

    def _logits(self, hidden: torch.Tensor, seqs: list[_Sequence]) -> torch.Tensor:
        """The step's scores [B, V] float32 from the final hidden states [B, C]: rows whose
        next token is a plain argmax go through the model's verified head when it has one
        (the float32 argmax at half the head's bytes; layers/verified_head.py), the others through
        the float32 head."""
        head = getattr(self.model, "verified_head", None)
        screened = [i for i, seq in enumerate(seqs) if head is not None and _argmax_only(seq)]
        if not screened:
            return self.model.lm_head(hidden).float()
        vocab = head.weight.shape[0]
        exact = sorted(set(range(len(seqs))) - set(screened))
        if not exact:
            return head.scores(hidden, _eos_masks(seqs, vocab), self.model.lm_head)
        logits = torch.empty(len(seqs), vocab, device=hidden.device)
        logits[screened] = head.scores(hidden[screened], _eos_masks([seqs[i] for i in screened], vocab),
                                       self.model.lm_head)
        logits[exact] = self.model.lm_head(hidden[exact]).float()
        return logits

    def _logits_device(self):
        return module_device(self.model.lm_head)

    def _advance(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """Chooses the sequence's next token from its logits [1, V] and emits it."""
        handle, params = seq.handle, seq.handle.params
        if handle.cancelled.is_set():
            self._finish(seq, FINISH_CANCELLED)
            return
        needs_ids = params.repetition_penalty != 1.0 or params.no_repeat_ngram_size > 0
        input_ids = torch.tensor([seq.ids], device=logits.device) if needs_ids else None
        choice = seq.chooser.choose(logits, input_ids, seq.generated)
        token = choice.token
        seq.ids.append(token)
        seq.last = token
        seq.generated += 1
        is_eos = token in params.eos_token_ids and not params.ignore_eos
        special = token in self.special_ids
        text, stopped = ("", False) if is_eos else seq.text.push(token)
        reason = None
        if is_eos:
            reason = FINISH_EOS
        elif stopped:
            reason = FINISH_STOP
        elif seq.generated >= params.max_new_tokens or len(seq.ids) >= self.model.max_positions:
            reason = FINISH_LENGTH
        if reason in (FINISH_EOS, FINISH_LENGTH):
            text += seq.text.finish()  # no token follows: release what was held back
        event = TokenEvent(seq.index, token, text, choice.logprob, special, choice.top)
        seq.tokens.append(event)
        handle._put(event)
        if reason is not None:
            self._finish(seq, reason)

    def _finish(self, seq: _Sequence, reason: str) -> None:
        if seq not in self._active:
            return
        self._active.remove(seq)
        self._reserved -= seq.reserved
        self.cache.free(seq.slot)
        handle = seq.handle
        handle._put(DoneEvent(seq.index, reason, seq.generated, seq.text.text, seq.tokens))
        if not any(s.handle is handle for s in self._active):
            handle._put(_END)

    def _fail(self, seqs: list[_Sequence], handle: RequestHandle, exc: Exception) -> None:
        for seq in seqs:
            if seq in self._active:
                self._active.remove(seq)
                self._reserved -= seq.reserved
                self.cache.free(seq.slot)
        if not isinstance(exc, PipeserveError):
            log.exception("generation failed", exc_info=exc)
            if isinstance(exc, torch.OutOfMemoryError):
                from ..errors import OutOfMemory
                exc = OutOfMemory("the device ran out of memory while generating; retry with a shorter request")
        handle._put(exc)
