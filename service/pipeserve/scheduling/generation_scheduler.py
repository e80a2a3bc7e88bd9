"""Who decodes next: the generation engine's waiting queue, its batch and token budgets, and the
cache slots its sequences hold.

Requests wait in arrival order (at most `max_queued`; QueueFull past that). Between steps the
head of the queue joins the batch while the bounds allow: at most `max_batch_size` sequences,
their reserved tokens (prompt + max_new_tokens, capped at the context) at most
`max_batch_tokens`; a request that does not fit waits, and so does everything behind it, so that
a large request is not starved by small ones overtaking it. A joining request gets one cache
slot per sequence; its prompt is then passed in groups: requests that join together with
prompts of equal length share their prompt passes. A sequence leaving (finished, cancelled,
failed) gives its slot and its tokens back at once.

No torch here: slots come from any allocator with allocate() and free(slot) (the KV cache), and
the engine says how a sequence's decoding state is made (`new_sequence`). After sequences leave,
`compact()` moves the decoding sequences in the highest slots down into the freed ones (an
allocator with `move_down(slot)`, the KV cache), so that a step's slots stay contiguous.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

from ..errors import InvalidInput, QueueFull
from .generation import GenerationParams
from .generation_requests import RequestHandle, Sequence


class SlotAllocator(Protocol):
    def allocate(self) -> int: ...

    def free(self, slot: int) -> None: ...


# (handle, sequence index, cache slot, reserved tokens) -> the sequence's decoding state
SequenceFactory = Callable[[RequestHandle, int, int, int], Sequence]


@dataclass
class Admission:
    """What one admission round did: the requests that joined (one list of sequences each),
    the cancelled ones it dropped from the queue, and those whose joining failed."""
    joined: list[list[Sequence]] = field(default_factory=list)
    dropped: list[RequestHandle] = field(default_factory=list)
    failed: list[tuple[RequestHandle, Exception]] = field(default_factory=list)


class Scheduler:
    """Queue, batch membership and slots. check(), enqueue() and close() are called from any
    thread; the rest by the engine's thread only."""

    def __init__(self, slots: SlotAllocator, new_sequence: SequenceFactory, *, max_positions: int,
                 max_batch_size: int, max_batch_tokens: int, max_queued: int):
        self.slots = slots
        self.new_sequence = new_sequence
        self.max_positions = max_positions
        self.max_batch_size, self.max_batch_tokens, self.max_queued = max_batch_size, max_batch_tokens, max_queued
        self.waiting: deque[RequestHandle] = deque()
        self.active: list[Sequence] = []
        self.reserved = 0  # tokens reserved by the active sequences
        self._holes = False  # a sequence left since the last compact()
        # Groups of joined requests whose prompts are still being passed, oldest first; a group's
        # requests have prompts of equal length and share each pass (one list of sequences each).
        self.prefilling: list[list[list[Sequence]]] = []
        self.lock = threading.Condition()  # guards `waiting` and `closed`; the engine waits on it when idle
        self.closed = False

    # ---- callers' side (any thread) --------------------------------------------------
    def reservation(self, prompt_len: int, params: GenerationParams) -> int:
        """Cache tokens one sequence of the request may come to hold."""
        return min(prompt_len + params.max_new_tokens, self.max_positions)

    def check(self, prompt_ids: list[int], params: GenerationParams) -> None:
        """Refuses, before it waits, a request that could never be admitted."""
        if not prompt_ids:
            raise InvalidInput("the prompt is empty")
        need = self.reservation(len(prompt_ids), params) * params.num_return_sequences
        if need > self.max_batch_tokens or params.num_return_sequences > self.max_batch_size:
            raise InvalidInput(f"the request needs {need} tokens of cache; this model serves at most "
                               f"{self.max_batch_tokens} tokens at once (lower max_new_tokens or num_return_sequences)")

    def enqueue(self, handle: RequestHandle) -> None:
        """Puts the request at the back of the queue and wakes the engine."""
        with self.lock:
            if self.closed:
                raise QueueFull("the generation engine is shut down")
            if len(self.waiting) >= self.max_queued:
                raise QueueFull(f"{self.max_queued} generation requests are already waiting for this model",
                                metadata={"limit": self.max_queued, "retry_after_ms": 500})
            self.waiting.append(handle)
            self.lock.notify()

    def close(self) -> None:
        """Refuses new requests from now on and wakes the engine to wind down."""
        with self.lock:
            self.closed = True
            self.lock.notify()

    def idle(self) -> bool:
        return not self.waiting and not self.active

    def wait_for_work(self) -> bool:
        """Blocks the engine's thread while there is nothing to do; False once closed."""
        with self.lock:
            while not self.closed and self.idle():
                self.lock.wait()
            return not self.closed

    # ---- the engine's thread ---------------------------------------------------------
    def cancelled(self) -> list[Sequence]:
        """Active sequences whose request was cancelled (the engine finishes them)."""
        return [seq for seq in self.active if seq.handle.cancelled.is_set()]

    def admit(self) -> Admission:
        """Moves waiting requests into the batch, in order, while the bounds allow. A request
        always joins an empty batch (check() ensured it fits one)."""
        admission = Admission()
        while True:
            with self.lock:
                if not self.waiting:
                    break
                handle = self.waiting[0]
                n = handle.params.num_return_sequences
                need = self.reservation(len(handle.prompt_ids), handle.params) * n
                if handle.cancelled.is_set():
                    self.waiting.popleft()
                    admission.dropped.append(handle)
                    continue
                if self.active and (len(self.active) + n > self.max_batch_size
                                    or self.reserved + need > self.max_batch_tokens):
                    break  # waits for sequences to leave
                self.waiting.popleft()
            try:
                admission.joined.append(self._join(handle))
            except Exception as exc:  # one bad request must not stop the engine
                self.release_request(handle)
                admission.failed.append((handle, exc))
        groups: dict[int, list[list[Sequence]]] = {}
        for seqs in admission.joined:
            groups.setdefault(len(seqs[0].handle.prompt_ids), []).append(seqs)
        self.prefilling.extend(groups.values())
        return admission

    def _join(self, handle: RequestHandle) -> list[Sequence]:
        """A cache slot and decoding state for each of the request's sequences."""
        handle.started_at = time.perf_counter()
        reserve = self.reservation(len(handle.prompt_ids), handle.params)
        seqs: list[Sequence] = []
        for i in range(handle.params.num_return_sequences):
            slot = self.slots.allocate()
            try:
                seq = self.new_sequence(handle, i, slot, reserve)
            except BaseException:
                self.slots.free(slot)
                raise
            seqs.append(seq)
            self.active.append(seq)
            self.reserved += reserve
        return seqs

    def next_prefill(self) -> list[list[Sequence]] | None:
        """The oldest group still passing its prompt, less its requests that have left (one
        list of sequences per request; the first sequence of each carries the pass)."""
        while self.prefilling:
            group = [seqs for seqs in self.prefilling[0] if seqs[0] in self.active]
            if group:
                self.prefilling[0] = group
                return group
            self.prefilling.pop(0)
        return None

    def prefill_done(self) -> None:
        """The oldest group's prompts are through: it decodes from now on."""
        self.prefilling.pop(0)

    def decoding(self) -> list[Sequence]:
        """The sequences of the next decoding step, in slot order (contiguous slots are read
        without a gather)."""
        return sorted((s for s in self.active if s.decoding), key=lambda s: s.slot)

    def release(self, seq: Sequence) -> bool:
        """Takes the sequence out of the batch and frees its slot and tokens. False when it had
        already left."""
        if seq not in self.active:
            return False
        self.active.remove(seq)
        self.reserved -= seq.reserved
        self.slots.free(seq.slot)
        self._holes = True
        return True

    def compact(self) -> int:
        """Moves decoding sequences, highest slot first, into free slots below them, until no
        free slot lies below the highest (the allocator's move_down copies a sequence's cache);
        -> how many moved. Prompt groups keep their slots until they decode."""
        move_down = getattr(self.slots, "move_down", None)
        if not self._holes or move_down is None:
            return 0
        self._holes = False
        moved = 0
        for seq in sorted((s for s in self.active if s.decoding), key=lambda s: -s.slot):
            slot = move_down(seq.slot)
            if slot is None:  # the lowest free slot is above this one, so above the rest too
                break
            seq.slot = slot
            moved += 1
        return moved

    def release_request(self, handle: RequestHandle) -> None:
        """Takes every active sequence of the request out of the batch."""
        for seq in [s for s in self.active if s.handle is handle]:
            self.release(seq)

    def serves(self, handle: RequestHandle) -> bool:
        """Whether any of the request's sequences is still in the batch."""
        return any(s.handle is handle for s in self.active)

    def take_waiting(self) -> list[RequestHandle]:
        """Empties the queue (at shutdown)."""
        with self.lock:
            handles, self.waiting = list(self.waiting), deque()
        return handles
