"""The generation engine's output processor alone, with a tokenizer whose tokens are fixed
strings: each token becomes a TokenEvent with the text it releases; stop sequences are held back
while they may still form and trimmed when they do; end-of-sequence, length and the context's
end finish a sequence and release what was held; DoneEvent and the stream's end; errors."""
from __future__ import annotations

import pytest
import torch

from pipeserve.errors import InvalidInput, OutOfMemory
from pipeserve.scheduling.generation import Choice, GenerationParams
from pipeserve.scheduling.generation_output import OutputProcessor
from pipeserve.scheduling.generation_requests import (FINISH_CANCELLED, FINISH_EOS, FINISH_LENGTH, FINISH_STOP,
                                                      DoneEvent, RequestHandle, Sequence, TokenEvent)

PIECES = ["Hello", " <", "|end", "|>", " more", "<s>", "</s>"]
HELLO, OPEN, END, CLOSE, MORE, BOS, EOS = range(len(PIECES))


class PieceTokenizer:
    """decode() joins fixed pieces; the last two ids are special tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(PIECES[i] for i in ids if not (skip_special_tokens and i in (BOS, EOS)))


def processor(max_positions: int = 100) -> OutputProcessor:
    return OutputProcessor(PieceTokenizer(), special_ids={BOS, EOS}, max_positions=max_positions)


def sequence(outputs: OutputProcessor, prompt=(BOS,), index=0, handle=None, **options) -> Sequence:
    params = GenerationParams(**{"eos_token_ids": (EOS,), "max_new_tokens": 10, **options})
    handle = handle or RequestHandle(list(prompt), params)
    return Sequence(handle, index, slot=0, chooser=None, text=outputs.text_stream(params), ids=list(prompt))


def feed(outputs: OutputProcessor, seq: Sequence, tokens: list[int]) -> list[str | None]:
    return [outputs.emit(seq, Choice(token)) for token in tokens]


def released(seq: Sequence) -> list[str]:
    return [event.text for event in seq.tokens]


def test_each_token_becomes_an_event_on_the_request_stream():
    outputs = processor()
    seq = sequence(outputs)
    assert outputs.emit(seq, Choice(HELLO, logprob=-0.5, top=[(HELLO, -0.5), (MORE, -1.2)])) is None
    assert seq.ids == [BOS, HELLO] and seq.last == HELLO and seq.generated == 1
    outputs.emit(seq, Choice(BOS))
    outputs.finish(seq, FINISH_LENGTH, request_done=True)
    events = list(seq.handle)
    assert events[:2] == seq.tokens
    assert events[0] == TokenEvent(0, HELLO, "Hello", -0.5, False, [(HELLO, -0.5), (MORE, -1.2)])
    assert events[1].special and events[1].text == ""
    assert events[2] == DoneEvent(0, FINISH_LENGTH, 2, "Hello", seq.tokens)


def test_a_stop_sequence_is_held_back_while_it_may_form_and_never_released():
    outputs = processor()
    seq = sequence(outputs, stop=("<|end|>",))
    assert feed(outputs, seq, [HELLO, OPEN, END, CLOSE]) == [None, None, None, FINISH_STOP]
    assert released(seq) == ["Hello", " ", "", ""]
    assert seq.text.text == "Hello "


def test_text_held_for_a_stop_sequence_that_does_not_form_comes_with_the_next_token():
    outputs = processor()
    seq = sequence(outputs, stop=("<|end|>",))
    assert feed(outputs, seq, [OPEN, MORE]) == [None, None]
    assert released(seq) == [" ", "< more"]


@pytest.mark.parametrize("last, reason", [(EOS, FINISH_EOS), (END, FINISH_LENGTH)])
def test_eos_and_length_release_what_was_held(last, reason):
    outputs = processor()
    seq = sequence(outputs, stop=("<|end|>",), max_new_tokens=3)
    assert feed(outputs, seq, [HELLO, OPEN, last]) == [None, None, reason]
    assert "".join(released(seq)) == seq.text.text == ("Hello <" if last == EOS else "Hello <|end")


def test_eos_is_a_token_like_any_other_when_ignored():
    outputs = processor()
    seq = sequence(outputs, ignore_eos=True, max_new_tokens=2)
    assert feed(outputs, seq, [EOS, HELLO]) == [None, FINISH_LENGTH]


def test_the_context_end_finishes_with_length():
    outputs = processor(max_positions=4)
    seq = sequence(outputs, prompt=(BOS, HELLO))
    assert feed(outputs, seq, [MORE, MORE]) == [None, FINISH_LENGTH]


def test_a_request_stream_ends_after_its_last_sequence():
    outputs = processor()
    first = sequence(outputs, num_return_sequences=2, do_sample=True)
    second = sequence(outputs, index=1, handle=first.handle)
    feed(outputs, first, [HELLO])
    outputs.finish(second, FINISH_CANCELLED, request_done=False)
    outputs.finish(first, FINISH_EOS, request_done=True)
    events = list(first.handle)
    done = [e for e in events if isinstance(e, DoneEvent)]
    assert [(d.index, d.finish_reason, d.text) for d in done] == [(1, FINISH_CANCELLED, ""), (0, FINISH_EOS, "Hello")]


def test_errors_end_the_stream_and_out_of_memory_is_named():
    outputs = processor()
    seq = sequence(outputs)
    outputs.fail(seq.handle, InvalidInput("bad"))
    with pytest.raises(InvalidInput, match="bad"):
        list(seq.handle)
    seq = sequence(outputs)
    outputs.fail(seq.handle, torch.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(OutOfMemory, match="ran out of memory"):
        list(seq.handle)
