"""Continuous batching for one causal LM: a thread that owns the model's KV cache and, one
compute-lane task per iteration, lets queued requests join, passes a chunk of the joining
prompts, and runs one decoding step for every decoding sequence in one forward pass.

The work is split three ways, each part with one job and its own tests:
- generation_scheduler.Scheduler: the queue (QueueFull past `max_queued`), who joins the batch
  under `max_batch_size` sequences and `max_batch_tokens` reserved tokens, cache slots, prompt
  groups, and sequences leaving (finished, cancelled, failed) with their slots freed at once;
- generation_steps.StepRunner: the model passes (prompt chunks of `prefill_chunk` tokens,
  decoding steps) and each sequence's next-token choice;
- generation_output.OutputProcessor: tokens -> TokenEvent/DoneEvent, text, stop sequences and
  finish reasons.
This module is the loop that wires them, and the public face pipelines use.

Callers get a `RequestHandle`: iterate it synchronously (worker threads) or with `async for`
(grpc.aio servicers); events are TokenEvent per token and DoneEvent per sequence.
"""
from __future__ import annotations

import logging
import threading

import torch

from ..layers.kv_cache import KVCache
from . import compute, exit_guard
from .generation import Choice, GenerationParams
from .generation_output import OutputProcessor
from .generation_requests import (FINISH_CANCELLED, FINISH_EOS, FINISH_LENGTH, FINISH_STOP, DoneEvent,
                                  RequestHandle, Sequence, TokenEvent)
from .generation_scheduler import Scheduler
from .generation_steps import StepRunner

__all__ = ["GenerationEngine", "RequestHandle", "TokenEvent", "DoneEvent",
           "FINISH_LENGTH", "FINISH_EOS", "FINISH_STOP", "FINISH_CANCELLED"]

log = logging.getLogger(__name__)


class GenerationEngine:
    def __init__(self, model, tokenizer, *, special_ids: set[int], clean_up_spaces: bool = False,
                 max_batch_size: int = 32, max_batch_tokens: int = 65536, max_queued: int = 256,
                 prefill_chunk: int = 512):
        self.tokenizer = tokenizer
        self.cache = KVCache(model.num_layers, model.kv_heads, model.head_dim, model.max_positions,
                             dtype=model.cache_dtype(), devices=model.cache_devices(), max_slots=max_batch_size,
                             windows=getattr(model, "layer_windows", None))
        self.runner = StepRunner(model, self.cache, prefill_chunk=prefill_chunk)
        self.outputs = OutputProcessor(tokenizer, special_ids=special_ids, max_positions=model.max_positions,
                                       clean_up_spaces=clean_up_spaces)
        self.scheduler = Scheduler(self.cache, self._new_sequence, max_positions=model.max_positions,
                                   max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
                                   max_queued=max_queued)
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()  # the thread starts with the first request
        exit_guard.register(self)  # its thread must not be inside the model when Python finalises

    # ---- public API -------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: GenerationParams) -> RequestHandle:
        self.scheduler.check(prompt_ids, params)
        handle = RequestHandle(prompt_ids, params)
        self.scheduler.enqueue(handle)
        with self._thread_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
                self._thread.start()
        return handle

    def close(self) -> None:
        for thread in self.stop_for_exit():
            thread.join(timeout=10)

    def stop_for_exit(self) -> list[threading.Thread]:
        """Refuses new requests and wakes the engine's thread to wind down, without waiting for
        it (exit_guard.py waits, within its deadline); -> that thread."""
        self.scheduler.close()
        with self._thread_lock:
            return [] if self._thread is None else [self._thread]

    def queued(self) -> int:
        return len(self.scheduler.waiting)

    def active(self) -> int:
        return len(self.scheduler.active)

    @property
    def model(self):
        return self.runner.model

    @model.setter
    def model(self, model) -> None:  # None at close: the engine must not keep the weights alive
        self.runner.model = model

    @property
    def max_batch_size(self) -> int:
        return self.scheduler.max_batch_size

    @property
    def steps(self) -> int:
        """Decoding steps run (for tests and metrics)."""
        return self.runner.steps

    @property
    def batch_sizes(self) -> list[int]:
        """Recent decoding batch sizes."""
        return self.runner.batch_sizes

    # ---- engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        scheduler = self.scheduler
        with torch.inference_mode():
            while scheduler.wait_for_work():
                try:
                    compute.call(self._iteration)  # one compute-lane task per iteration
                except Exception as exc:  # a bug here must not leave callers waiting forever
                    log.exception("generation engine step failed")
                    for handle in {s.handle for s in scheduler.active}:
                        self._fail(handle, exc)
        for seq in list(scheduler.active):
            self._finish(seq, FINISH_CANCELLED)
        for handle in scheduler.take_waiting():
            handle.end()

    def _iteration(self) -> None:
        """Drops cancelled sequences, admits waiting requests, runs a prompt chunk and one
        decoding step."""
        for seq in self.scheduler.cancelled():
            self._finish(seq, FINISH_CANCELLED)
        admission = self.scheduler.admit()
        for handle in admission.dropped:
            handle.end()
        for handle, exc in admission.failed:
            self.outputs.fail(handle, exc)
        group = self.scheduler.next_prefill()
        if group is not None:
            self._prefill(group)
        self.scheduler.compact()  # the step's slots contiguous again after sequences left
        decoding = self.scheduler.decoding()
        if decoding:
            self._decode(decoding)

    def _new_sequence(self, handle: RequestHandle, index: int, slot: int, reserved: int) -> Sequence:
        return Sequence(handle, index, slot, self.runner.chooser(handle.params, index),
                        self.outputs.text_stream(handle.params), list(handle.prompt_ids), reserved=reserved)

    def _prefill(self, group: list[list[Sequence]]) -> None:
        try:
            logits = self.runner.prefill(group)
        except Exception as exc:
            self.scheduler.prefill_done()
            for seqs in group:
                self._fail(seqs[0].handle, exc)
            return
        if logits is None:
            return  # more chunks to pass
        self.scheduler.prefill_done()
        for row, seqs in enumerate(group):
            for seq in seqs:
                self._advance(seq, self.runner.choose(seq, logits[row:row + 1]))

    def _decode(self, seqs: list[Sequence]) -> None:
        try:
            # all plain greedy rows: the verified head's choices, without [B, V] scores
            tokens = self.runner.decode_argmax(seqs)
            choices = ([Choice(token) for token in tokens] if tokens is not None
                       else self.runner.choose_all(seqs, self.runner.decode(seqs)))
        except Exception as exc:
            for handle in {s.handle for s in seqs}:
                self._fail(handle, exc)
            return
        for seq, choice in zip(seqs, choices):
            if seq in self.scheduler.active:
                self._advance(seq, choice)

    def _advance(self, seq: Sequence, choice: Choice) -> None:
        """Emits the sequence's next token (unless it was cancelled meanwhile)."""
        if seq.handle.cancelled.is_set():
            self._finish(seq, FINISH_CANCELLED)
            return
        reason = self.outputs.emit(seq, choice)
        if reason is not None:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if self.scheduler.release(seq):
            self.outputs.finish(seq, reason, request_done=not self.scheduler.serves(seq.handle))

    def _fail(self, handle: RequestHandle, exc: Exception) -> None:
        self.scheduler.release_request(handle)
        self.outputs.fail(handle, exc)
