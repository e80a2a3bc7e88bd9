"""The generation engine's scheduler alone, without a model: admission in arrival order under
max_batch_size and max_batch_tokens, one slot per sequence, prompt groups, cancelled and failed
requests giving their slots back, and the queue bound."""
from __future__ import annotations

import pytest

from pipeserve.errors import InvalidInput, QueueFull
from pipeserve.scheduling.generation import GenerationParams
from pipeserve.scheduling.generation_requests import RequestHandle, Sequence
from pipeserve.scheduling.generation_scheduler import Scheduler


class Slots:
    """A slot allocator that remembers which slots are in use, lowest free slot first."""

    def __init__(self, limit: int = 64):
        self.limit = limit
        self.used: set[int] = set()

    def allocate(self) -> int:
        slot = min(set(range(self.limit)) - self.used)
        self.used.add(slot)
        return slot

    def free(self, slot: int) -> None:
        self.used.remove(slot)


def plain_sequence(handle: RequestHandle, index: int, slot: int, reserved: int) -> Sequence:
    # The scheduler never reads the chooser or the text stream.
    return Sequence(handle, index, slot, chooser=None, text=None, ids=list(handle.prompt_ids), reserved=reserved)


def make(slots=None, *, max_positions=1000, max_batch_size=8, max_batch_tokens=10_000, max_queued=16,
         new_sequence=plain_sequence) -> Scheduler:
    return Scheduler(slots or Slots(), new_sequence, max_positions=max_positions, max_batch_size=max_batch_size,
                     max_batch_tokens=max_batch_tokens, max_queued=max_queued)


def request(prompt_len: int = 4, max_new_tokens: int = 6, n: int = 1) -> RequestHandle:
    params = GenerationParams(max_new_tokens=max_new_tokens, num_return_sequences=n, do_sample=n > 1)
    return RequestHandle(list(range(1, prompt_len + 1)), params)


def submit(scheduler: Scheduler, *handles: RequestHandle) -> None:
    for handle in handles:
        scheduler.check(handle.prompt_ids, handle.params)
        scheduler.enqueue(handle)


def joined_handles(admission) -> list[RequestHandle]:
    return [seqs[0].handle for seqs in admission.joined]


def test_requests_join_in_arrival_order_up_to_max_batch_size():
    scheduler = make(max_batch_size=2)
    a, b, c = request(), request(), request()
    submit(scheduler, a, b, c)
    admission = scheduler.admit()
    assert joined_handles(admission) == [a, b]
    assert list(scheduler.waiting) == [c] and len(scheduler.active) == 2
    assert a.started_at is not None and c.started_at is None
    assert joined_handles(scheduler.admit()) == [], "a full batch admits nothing"
    assert scheduler.release(admission.joined[0][0])
    assert joined_handles(scheduler.admit()) == [c]
    assert [s.handle for s in scheduler.active] == [b, c]


def test_token_budget_holds_the_head_back_and_everything_behind_it():
    # Reservations: prompt + max_new_tokens, capped at the context (max_positions).
    scheduler = make(max_positions=30, max_batch_tokens=40)
    big = request(prompt_len=10, max_new_tokens=15)  # 25
    bigger = request(prompt_len=10, max_new_tokens=50)  # 60 capped at 30
    small = request(prompt_len=2, max_new_tokens=2)  # 4: fits, but must not overtake
    submit(scheduler, big, bigger, small)
    assert joined_handles(scheduler.admit()) == [big]
    assert scheduler.reserved == 25 and list(scheduler.waiting) == [bigger, small]
    scheduler.release(scheduler.active[0])
    assert scheduler.reserved == 0
    assert joined_handles(scheduler.admit()) == [bigger, small]
    assert scheduler.reserved == 34


def test_each_returned_sequence_takes_a_slot_and_its_tokens():
    slots = Slots()
    scheduler = make(slots, max_batch_size=4)
    three, two = request(n=3), request(n=2)
    submit(scheduler, three, two)
    [seqs] = scheduler.admit().joined
    assert [s.index for s in seqs] == [0, 1, 2] and len({s.slot for s in seqs}) == 3
    assert slots.used == {s.slot for s in seqs}
    assert scheduler.reserved == 3 * 10
    assert list(scheduler.waiting) == [two], "3 + 2 sequences exceed max_batch_size 4"


def test_requests_that_could_never_join_are_refused_before_they_wait():
    scheduler = make(max_positions=100, max_batch_size=4, max_batch_tokens=50)
    with pytest.raises(InvalidInput, match="empty"):
        scheduler.check([], GenerationParams())
    with pytest.raises(InvalidInput, match="needs 60 tokens of cache"):
        scheduler.check([1] * 10, GenerationParams(max_new_tokens=50))
    with pytest.raises(InvalidInput, match="tokens of cache"):
        scheduler.check([1], GenerationParams(max_new_tokens=5, num_return_sequences=5, do_sample=True))
    scheduler.check([1] * 10, GenerationParams(max_new_tokens=40))  # exactly the budget


def test_queue_full_past_max_queued_and_after_close():
    scheduler = make(max_queued=2)
    submit(scheduler, request(), request())
    with pytest.raises(QueueFull) as full:
        submit(scheduler, request())
    assert full.value.metadata["limit"] == "2"
    assert len(scheduler.waiting) == 2
    scheduler.admit()
    submit(scheduler, request())  # room again once the queue moved into the batch
    scheduler.close()
    assert not scheduler.wait_for_work(), "a closed scheduler sends the engine home"
    with pytest.raises(QueueFull, match="shut down"):
        submit(scheduler, request())


def test_cancelled_requests_leave_the_queue_and_give_their_slots_back():
    slots = Slots()
    scheduler = make(slots, max_batch_size=2)
    running, waiting_cancelled, after = request(n=2), request(), request()
    submit(scheduler, running, waiting_cancelled, after)
    scheduler.admit()
    waiting_cancelled.cancel()
    running.cancel()
    cancelled = scheduler.cancelled()
    assert {s.handle for s in cancelled} == {running} and len(cancelled) == 2
    assert scheduler.release(cancelled[0]) and scheduler.serves(running)
    assert scheduler.release(cancelled[1]) and not scheduler.serves(running)
    assert not scheduler.release(cancelled[1]), "a sequence leaves once"
    assert slots.used == set() and scheduler.reserved == 0
    admission = scheduler.admit()
    assert admission.dropped == [waiting_cancelled], "never joins, never holds a slot"
    assert joined_handles(admission) == [after] and len(slots.used) == 1


def test_a_request_whose_joining_fails_frees_what_it_took():
    slots = Slots()

    def second_fails(handle, index, slot, reserved):
        if index == 1:
            raise RuntimeError("no state for you")
        return plain_sequence(handle, index, slot, reserved)

    scheduler = make(slots, new_sequence=second_fails)
    bad, good = request(n=2), request()
    submit(scheduler, bad, good)
    admission = scheduler.admit()
    assert [(h, str(e)) for h, e in admission.failed] == [(bad, "no state for you")]
    assert joined_handles(admission) == [good]
    assert [s.handle for s in scheduler.active] == [good] and len(slots.used) == 1
    assert scheduler.reserved == 10


def test_prompts_of_equal_length_that_join_together_share_a_group():
    scheduler = make()
    a, b, c = request(prompt_len=5), request(prompt_len=3), request(prompt_len=5)
    submit(scheduler, a, b, c)
    scheduler.admit()
    group = scheduler.next_prefill()
    assert [seqs[0].handle for seqs in group] == [a, c]
    scheduler.release(group[0][0])  # a leaves mid-prompt: the group goes on without it
    assert [seqs[0].handle for seqs in scheduler.next_prefill()] == [c]
    scheduler.prefill_done()
    assert [seqs[0].handle for seqs in scheduler.next_prefill()] == [b]
    scheduler.release_request(b)
    assert scheduler.next_prefill() is None, "a group whose requests all left is skipped"
    assert scheduler.prefilling == []


def test_a_decoding_step_takes_the_decoding_sequences_in_slot_order():
    scheduler = make()
    handles = [request() for _ in range(4)]
    submit(scheduler, *handles)
    scheduler.admit()
    first, second, third, fourth = scheduler.active
    scheduler.release(first)
    submit(scheduler, request())
    [[late]] = scheduler.admit().joined  # takes the freed slot 0, after the others in `active`
    for seq in (fourth, late, second):
        seq.decoding = True
    assert scheduler.decoding() == [late, second, fourth]
    assert [s.slot for s in scheduler.decoding()] == [0, 1, 3]
    assert third not in scheduler.decoding(), "still passing its prompt"


def test_take_waiting_empties_the_queue():
    scheduler = make()
    handles = [request(), request()]
    submit(scheduler, *handles)
    assert not scheduler.idle()
    assert scheduler.take_waiting() == handles
    assert scheduler.idle()
