"""The running batch of the Whisper batch scheduler (batch_scheduler.py): windows of several
calls decoding together, one step at a time.

Each window keeps what decoding.decode_window keeps for it: its key/value cache (own
positions, own encoder keys), its logit filters and its token decoder. A step asks every
window's decoder for its next tokens (a window that is done or whose caller stopped leaves
here, and its caller gets its results), runs one decoder step over the rows of all windows
left (WhisperDecoder.hidden_step: the projections and MLP over all rows, attention per
window), then scores each window's rows: greedy rows together through the verified head
(`screened.scores` takes [rows, d]), the others through the float32 projection; each window's
filters shape its own rows. A window's rows get the numbers they get alone: every row-wise
product is computed the same for any number of rows from two up, and one row as two
(models/whisper.one_row_as_two), and attention never mixes windows.
"""
from __future__ import annotations

from concurrent.futures import Future
from typing import Callable

import torch

from .decoding import first_scores, prefill_hidden, project
from .generation_settings import GenerationSettings
from .logit_filters import LogitFilters
from .token_decoders import GreedyDecoder, TokenDecoder


class ActiveWindow:
    """One window's rows in the scheduler: its inputs, its decoding state, its caller's future."""

    def __init__(self, encoder_out: torch.Tensor, prompt: torch.Tensor, sot_index: int, settings: GenerationSettings,
                 filters: LogitFilters, decoder: TokenDecoder, should_stop: Callable[[], bool] | None):
        self.encoder_out, self.prompt, self.sot_index, self.settings = encoder_out, prompt, sot_index, settings
        self.filters, self.decoder, self.should_stop = filters, decoder, should_stop
        self.decoder_rows = prompt.shape[0]
        # Windows count towards the batch cap (a beam-search window is one window on `beams` rows).
        self.rows = self.decoder_rows if isinstance(decoder, GreedyDecoder) else 1
        self.future: Future = Future()
        self.peak_rows = 0  # the most windows one of its steps served
        self.cache = None
        self.no_speech: list[float] = []
        self.scores: torch.Tensor | None = None
        self.tokens: list[int] = []

    def start(self, model_decoder) -> torch.Tensor:
        """The prompt through the decoder layers -> the hidden states whose projection
        `started` takes [rows, 2, d_model] (decoding.prefill_hidden)."""
        self.cache, h = prefill_hidden(model_decoder, self.encoder_out, self.prompt, self.sot_index, self.decoder)
        self.encoder_out = None  # the cache holds its keys and values
        return h

    def started(self, logits: torch.Tensor) -> None:
        self.no_speech, self.scores = first_scores(logits, self.settings, self.filters, self.decoder)

    def screened(self, model_decoder) -> bool:
        return self.decoder.screened_head_ok and model_decoder.verified_head is not None

    def finish(self) -> None:
        results = self.decoder.finalize(self.no_speech)
        self._release()
        self.future.set_result(results)

    def fail(self, exc: BaseException) -> None:
        self._release()
        if not self.future.done():
            self.future.set_exception(exc)

    def _release(self) -> None:
        self.cache = self.scores = self.encoder_out = None


class WindowBatch:
    """The windows decoding together (module doc)."""

    def __init__(self, model_decoder):
        self.model_decoder = model_decoder
        self.windows: list[ActiveWindow] = []

    @property
    def active(self) -> bool:
        return bool(self.windows)

    @property
    def rows(self) -> int:
        return sum(w.rows for w in self.windows)

    def join(self, windows: list[ActiveWindow]) -> None:
        """Prefills the windows' prompts and adds their rows to the batch. Each prompt runs
        through the decoder layers alone; the vocabulary projection of their first positions
        runs once for all of them (it reads the whole head, the largest weight, whatever the
        rows; a row's logits do not depend on the rows projected with it: models/whisper.py
        one_row_as_two). A window whose prefill fails leaves (its caller gets the error)."""
        hidden = []
        for window in windows:
            try:
                hidden.append((window, window.start(self.model_decoder)))
            except Exception as exc:  # its caller gets it; the batch goes on
                window.fail(exc)
        if not hidden:
            return
        try:
            h = torch.cat([x.reshape(-1, x.shape[-1]) for _, x in hidden])
            logits = project(self.model_decoder, h)
        except Exception as exc:  # the shared projection failed: these callers hear of it
            for window, _ in hidden:
                window.fail(exc)
            return
        start = 0
        for window, x in hidden:
            end = start + x.shape[0] * x.shape[1]
            self._set_scores(window, lambda w=window, a=start, b=end, shape=x.shape: w.started(
                logits[a:b].view(shape[0], shape[1], -1)), None)
            start = end
            if not window.future.done():
                self.windows.append(window)

    def step(self) -> None:
        live = []
        for w in self.windows:
            try:
                step = w.decoder.update(w.scores)
                if step.done or (w.should_stop is not None and w.should_stop()):
                    w.finish()
                    continue
                if step.reorder is not None:
                    w.cache.reorder(step.reorder)
                w.tokens = step.tokens
                live.append(w)
            except Exception as exc:
                w.fail(exc)
        self.windows = live
        if not live:
            return
        rows = sum(w.rows for w in live)
        for w in live:
            w.peak_rows = max(w.peak_rows, rows)
        try:
            device = live[0].cache.k[0].device
            tokens = torch.tensor([t for w in live for t in w.tokens], device=device)
            h = self.model_decoder.hidden_step(tokens, [w.cache for w in live])
        except Exception as exc:  # the shared step failed: every window's caller hears of it
            self.fail_all(exc)
            return
        spans, start = [], 0
        for w in live:
            spans.append((start, start + w.decoder_rows))
            start += w.decoder_rows
        screened = [(w, span) for w, span in zip(live, spans) if w.screened(self.model_decoder)]
        exact = [(w, span) for w, span in zip(live, spans) if not w.screened(self.model_decoder)]
        for group, score in ((screened, self._score_screened), (exact, self._score_exact)):
            if not group:
                continue
            try:
                score(h, group)
            except Exception as exc:  # the shared projection failed: the group's callers hear of it
                for w, _ in group:
                    w.fail(exc)
        self.windows = [w for w in live if not w.future.done()]

    @staticmethod
    def _rows_of(h: torch.Tensor, group: list[tuple[ActiveWindow, tuple[int, int]]]):
        """The group's rows of h, and each window's span in them."""
        local, start = [], 0
        for w, (a, b) in group:
            local.append((start, start + b - a))
            start += b - a
        if len(group) == 1:
            a, b = group[0][1]
            return h[a:b], local
        return torch.cat([h[a:b] for _, (a, b) in group]), local

    def _score_screened(self, h: torch.Tensor, group) -> None:
        """Greedy windows: the verified head over all their rows, each window's masks on its
        rows; a window whose filters fail leaves (its caller gets the error)."""
        rows, local = self._rows_of(h, group)
        windows = [w for w, _ in group]
        failed: dict[int, Exception] = {}

        def mask(x: torch.Tensor) -> None:
            for i, (w, (a, b)) in enumerate(zip(windows, local)):
                if i not in failed:
                    try:
                        w.filters.mask(x[a:b], w.decoder.sequences)
                    except Exception as exc:
                        failed[i] = exc

        scores = self.model_decoder.verified_head.scores(rows, mask, lambda x: project(self.model_decoder, x))
        for i, (w, (a, b)) in enumerate(zip(windows, local)):
            self._set_scores(w, lambda: w.filters.read(scores[a:b], w.decoder.sequences), failed.get(i))

    def _score_exact(self, h: torch.Tensor, group) -> None:
        """Sampling and beam-search windows: the float32 projection, each window's filters."""
        rows, local = self._rows_of(h, group)
        logits = project(self.model_decoder, rows)
        for (w, _), (a, b) in zip(group, local):
            self._set_scores(w, lambda: w.filters(w.decoder.scores(logits[a:b]), w.decoder.sequences), None)

    @staticmethod
    def _set_scores(w: ActiveWindow, scores: Callable[[], torch.Tensor | None], failed: Exception | None) -> None:
        """w.scores = scores() (None: `scores` set them itself); an error fails the window."""
        if failed is None:
            try:
                result = scores()
                if result is not None:
                    w.scores = result
                return
            except Exception as exc:
                failed = exc
        w.fail(failed)

    def fail_all(self, exc: BaseException) -> None:
        for w in self.windows:
            w.fail(exc)
        self.windows = []
