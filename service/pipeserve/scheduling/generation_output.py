"""What the caller of the generation engine sees: each chosen token as a TokenEvent with the text
it releases, each finished sequence as a DoneEvent, then the end of the request's stream.

A token ends its sequence with a finish reason: `eos_token` (one of the request's
end-of-sequence ids, unless ignore_eos), `stop_sequence` (the released text reached one of the
request's stop sequences: text that could still become one is held back, and the stop sequence
itself is never released; scheduling/generation.py TextStream), or `length` (max_new_tokens, or
the model's context is full). At eos and length nothing follows, so the held-back text is
released with the last token. `cancelled` ends a sequence whose caller went away. A request
that fails gets its error as the last item of its stream (OutOfMemory for the device's).
"""
from __future__ import annotations

import logging

import torch

from ..errors import OutOfMemory, PipeserveError
from .generation import Choice, GenerationParams, TextStream, byte_fallback_tokens
from .generation_requests import (FINISH_EOS, FINISH_LENGTH, FINISH_STOP, DoneEvent, RequestHandle, Sequence,
                                  TokenEvent)

log = logging.getLogger(__name__)


class OutputProcessor:
    """Tokens -> text -> events. Called by the engine's thread only."""

    def __init__(self, tokenizer, *, special_ids: set[int], max_positions: int, clean_up_spaces: bool = False):
        self.tokenizer = tokenizer
        self.special_ids = special_ids
        self.max_positions = max_positions
        self.clean_up_spaces = clean_up_spaces
        self.byte_tokens = byte_fallback_tokens(tokenizer) if hasattr(tokenizer, "to_str") else frozenset()

    def text_stream(self, params: GenerationParams) -> TextStream:
        """A new sequence's detokenizer, holding back what may become one of its stop sequences."""
        return TextStream(self.tokenizer, params.stop, self.clean_up_spaces, self.byte_tokens)

    def emit(self, seq: Sequence, choice: Choice) -> str | None:
        """Appends the chosen token to the sequence and sends its TokenEvent. Returns the finish
        reason when this token ends the sequence, else None."""
        params = seq.params
        token = choice.token
        seq.ids.append(token)
        seq.last = token
        seq.generated += 1
        is_eos = token in params.eos_token_ids and not params.ignore_eos
        text, stopped = ("", False) if is_eos else seq.text.push(token)
        reason = None
        if is_eos:
            reason = FINISH_EOS
        elif stopped:
            reason = FINISH_STOP
        elif seq.generated >= params.max_new_tokens or len(seq.ids) >= self.max_positions:
            reason = FINISH_LENGTH
        if reason in (FINISH_EOS, FINISH_LENGTH):
            text += seq.text.finish()  # no token follows: release what was held back
        event = TokenEvent(seq.index, token, text, choice.logprob, token in self.special_ids, choice.top)
        seq.tokens.append(event)
        seq.handle.put(event)
        return reason

    @staticmethod
    def finish(seq: Sequence, reason: str, *, request_done: bool) -> None:
        """Sends the sequence's DoneEvent; ends the request's stream after its last sequence."""
        seq.handle.put(DoneEvent(seq.index, reason, seq.generated, seq.text.text, seq.tokens))
        if request_done:
            seq.handle.end()

    @staticmethod
    def fail(handle: RequestHandle, exc: Exception) -> None:
        """Ends the request's stream with its error (an unexpected one is logged and, when the
        device ran out of memory, told to the caller as OutOfMemory)."""
        if not isinstance(exc, PipeserveError):
            log.exception("generation failed", exc_info=exc)
            if isinstance(exc, torch.OutOfMemoryError):
                exc = OutOfMemory("the device ran out of memory while generating; retry with a shorter request")
        handle.put(exc)
