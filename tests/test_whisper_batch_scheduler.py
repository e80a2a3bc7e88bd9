"""The Whisper batch scheduler's rules, step by step on a tiny random checkpoint
(pipelines/whisper/window_batch.py, batch_scheduler.py): windows join between steps at their
own positions, leave when done or stopped, a failing window fails its caller only, closing
the scheduler fails waiting calls with DRAINING, and a caller on the compute lane decodes
inline (waiting there for a lane task would deadlock)."""
from __future__ import annotations

import pytest
import torch

import whisper_checkpoints as wc
from harness import load_pipeline

pytest.importorskip("transformers")
MAX_NEW = 12


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_pipeline(wc.build(tmp_path_factory.mktemp("sched") / "whisper", multilingual=False))


@pytest.fixture(scope="module")
def encoder_out(pipe):
    torch.manual_seed(1)
    with torch.inference_mode():
        return pipe.model.encoder(torch.randn(3, pipe.n_mels, 3000))


class _Boom(Exception):
    pass


def _window(pipe, encoder_out, row: int, *, timestamps: bool, rows: int = 1, should_stop=None, extra=None,
            temperature: float = 0.0):
    from pipeserve.pipelines.whisper.decoding import window_filters
    from pipeserve.pipelines.whisper.logit_filters import LogitFilters
    from pipeserve.pipelines.whisper.token_decoders import GreedyDecoder
    from pipeserve.pipelines.whisper.window_batch import ActiveWindow

    s = pipe.settings
    filters = window_filters(s, pipe.model.config.vocab_size, encoder_out.device, timestamps)
    if extra is not None:
        filters = LogitFilters(filters.masks + [extra] + filters.readers)
    start = [s.decoder_start_token_id] + ([] if timestamps else [s.no_timestamps_token_id])
    prompt = torch.tensor([start] * rows)
    generator = torch.Generator().manual_seed(row) if temperature else None
    decoder = GreedyDecoder(rows, MAX_NEW, s.eos_token_id, s.pad_token_id, temperature, generator)
    return ActiveWindow(encoder_out[row:row + 1].expand(rows, -1, -1), prompt, 0, s, filters, decoder, should_stop)


def _alone(pipe, window):
    """decode_window (the inline path) on the compute lane when there is one, where the
    scheduler's steps run too (same thread count, same kernels)."""
    from pipeserve.pipelines.whisper.decoding import decode_window
    from pipeserve.scheduling import compute

    return compute.call(decode_window, pipe.model, window.encoder_out, window.prompt, window.sot_index,
                        window.settings, window.filters, window.decoder, window.should_stop)


def _run(batch, joins: dict[int, list]) -> int:
    """Steps the batch until it is empty; joins[k]: windows that join before step k. -> steps."""
    from pipeserve.scheduling import compute

    return compute.call(_steps, batch, joins)


def _steps(batch, joins: dict[int, list]) -> int:
    steps = 0
    with torch.inference_mode():
        while True:
            batch.join(joins.pop(steps, []))
            if not batch.active and not joins:
                return steps
            batch.step()
            steps += 1


class _Results:
    """A window's results compared as a caller sees them: tokens exactly, log-probabilities
    within the verified head's tolerance (its screened tail, and whether a step screened,
    depend on the head's recent calls: layers/verified_head.py)."""

    def __init__(self, results):
        self.results = results

    def __eq__(self, other) -> bool:
        return len(self.results) == len(other.results) and all(
            a.tokens == b.tokens and a.logprobs == pytest.approx(b.logprobs, abs=2e-4)
            for a, b in zip(self.results, other.results))

    def __repr__(self) -> str:
        return repr([(r.tokens, r.logprobs) for r in self.results])


def _tokens(results) -> _Results:
    return _Results(results)


def test_windows_join_between_steps_and_get_their_alone_results(pipe, encoder_out):
    from pipeserve.pipelines.whisper.window_batch import WindowBatch

    kinds = [dict(row=0, timestamps=True), dict(row=1, timestamps=False, rows=2), dict(row=2, timestamps=True),
             dict(row=1, timestamps=True, temperature=0.7)]
    alone = [_tokens(_alone(pipe, _window(pipe, encoder_out, **k))) for k in kinds]
    windows = [_window(pipe, encoder_out, **k) for k in kinds]
    batch = WindowBatch(pipe.model.decoder)
    _run(batch, {0: windows[:2], 3: windows[2:3], 5: windows[3:]})
    assert [_tokens(w.future.result()) for w in windows] == alone
    # 1 + 2 + 1 + 1 rows decoded together once the last one joined.
    assert windows[0].peak_rows == windows[3].peak_rows == 5
    assert all(w.cache is None for w in windows)  # a window that left holds no cache


def test_a_failing_window_fails_its_caller_only(pipe, encoder_out):
    from pipeserve.pipelines.whisper.logit_filters import LogitFilter
    from pipeserve.pipelines.whisper.window_batch import WindowBatch

    class Boom(LogitFilter):
        def apply(self, scores, generated):
            if len(generated[0]) >= 2:
                raise _Boom("a filter failed")

    good = dict(row=0, timestamps=True)
    alone = _tokens(_alone(pipe, _window(pipe, encoder_out, **good)))
    bad, ok = _window(pipe, encoder_out, 1, timestamps=True, extra=Boom()), _window(pipe, encoder_out, **good)
    batch = WindowBatch(pipe.model.decoder)
    _run(batch, {0: [bad, ok]})
    with pytest.raises(_Boom):
        bad.future.result()
    assert _tokens(ok.future.result()) == alone


def test_windows_joining_together_share_one_projection_and_a_failing_one_leaves_alone(pipe, encoder_out):
    """Windows that join at the same step prefill their prompts one by one but project their
    first positions through the vocabulary head once (it is read whole for any rows); a window
    whose first scores fail leaves, the others get their alone results."""
    from pipeserve.pipelines.whisper.logit_filters import LogitFilter
    from pipeserve.pipelines.whisper.window_batch import WindowBatch

    class BoomAtOnce(LogitFilter):
        def apply(self, scores, generated):
            raise _Boom("a filter failed on the first scores")

    kinds = [dict(row=0, timestamps=True), dict(row=1, timestamps=False, rows=2), dict(row=2, timestamps=True)]
    alone = [_tokens(_alone(pipe, _window(pipe, encoder_out, **k))) for k in kinds]
    windows = [_window(pipe, encoder_out, **k) for k in kinds]
    bad = _window(pipe, encoder_out, 1, timestamps=True, extra=BoomAtOnce())
    projections = []
    hook = pipe.model.decoder.proj_out.register_forward_hook(lambda m, args, out: projections.append(args[0].shape))
    try:
        batch = WindowBatch(pipe.model.decoder)
        from pipeserve.scheduling import compute

        compute.call(lambda: batch.join([windows[0], bad, *windows[1:]]))
        # one projection of 2 positions x (1 + 1 + 2 + 1) rows
        assert [tuple(p) for p in projections] == [(10, pipe.model.config.d_model)]
        assert [w for w in batch.windows] == windows
        _run(batch, {})
    finally:
        hook.remove()
    with pytest.raises(_Boom):
        bad.future.result()
    assert [_tokens(w.future.result()) for w in windows] == alone


def test_a_stopped_caller_leaves_at_the_next_step(pipe, encoder_out):
    from pipeserve.pipelines.whisper.window_batch import WindowBatch

    calls = []

    def stop_after_two() -> bool:
        calls.append(1)
        return len(calls) > 2

    stopped = _window(pipe, encoder_out, 0, timestamps=False, should_stop=stop_after_two)
    other = _window(pipe, encoder_out, 2, timestamps=False)
    alone = _tokens(_alone(pipe, _window(pipe, encoder_out, 2, timestamps=False)))
    batch = WindowBatch(pipe.model.decoder)
    _run(batch, {0: [stopped, other]})
    assert len(stopped.future.result()[0].tokens) == 3  # the step that saw the stop was its last
    assert _tokens(other.future.result()) == alone


def test_closing_the_scheduler_refuses_with_draining_and_later_calls_run_inline(pipe, encoder_out):
    from pipeserve.errors import Draining
    from pipeserve.pipelines.whisper.batch_scheduler import BatchScheduler
    from pipeserve.pipelines.whisper.decoding import InlineRunner

    from pipeserve.scheduling import compute

    compute.install()  # batching needs the lane (process-wide, as every in-process server test leaves it)
    scheduler = BatchScheduler(pipe.model, 4)
    session = scheduler.session()
    assert not isinstance(session, InlineRunner)
    w = _window(pipe, encoder_out, 0, timestamps=True)
    with torch.inference_mode():
        out = session.decode(pipe.model, w.encoder_out, w.prompt, 0, w.settings, w.filters, w.decoder, None)
    assert _tokens(out) == _tokens(_alone(pipe, _window(pipe, encoder_out, 0, timestamps=True)))
    scheduler.close()
    w = _window(pipe, encoder_out, 0, timestamps=True)
    with pytest.raises(Draining):
        session.decode(pipe.model, w.encoder_out, w.prompt, 0, w.settings, w.filters, w.decoder, None)
    assert isinstance(scheduler.session(), InlineRunner)


def test_a_caller_on_the_compute_lane_decodes_inline(pipe, encoder_out, monkeypatch):
    from pipeserve.pipelines.whisper import batch_scheduler
    from pipeserve.pipelines.whisper.batch_scheduler import BatchScheduler

    scheduler = BatchScheduler(pipe.model, 4)
    monkeypatch.setattr(batch_scheduler.compute, "installed", lambda: True)
    monkeypatch.setattr(batch_scheduler.compute, "on_lane", lambda: True)
    session = scheduler.session()
    w = _window(pipe, encoder_out, 1, timestamps=True)
    with torch.inference_mode():
        out = session.decode(pipe.model, w.encoder_out, w.prompt, 0, w.settings, w.filters, w.decoder, None)
        windows = torch.randn(1, pipe.n_mels, 3000)
        encoded = session.encode(pipe.model, windows)
        assert torch.equal(encoded, pipe.model.encoder(windows))
    assert scheduler._thread is None  # nothing went to the scheduler
    assert _tokens(out) == _tokens(_alone(pipe, _window(pipe, encoder_out, 1, timestamps=True)))
