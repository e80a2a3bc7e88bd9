"""A leaner Gemma 3 decoding step (issue 15): the rotary table gathers rows equal to computing them,
packed linears take F.linear on their dense weight for few rows and the packed kernel above,
small decoding attention and int8 row quantization run on one thread with the same result and
leave the thread count as found, decoding steps allocate no new cache tensors, and a sequence
leaving the middle of the batch leaves no hole in the next steps' slots."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeserve.layers import kv_cache
from pipeserve.layers.kv_cache import KVCache
from pipeserve.layers.packed_linear import DENSE_ROWS, PackedLinear, pack_linears, supported
from pipeserve.models import gemma3
from pipeserve.models.gemma3 import FULL, SLIDING, Gemma3ForCausalLM, Gemma3TextConfig, Rotary

CONFIG = Gemma3TextConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=8,
                          sliding_window_pattern=3, query_pre_attn_scalar=16, rope_theta=1_000_000.0,
                          rope_local_base_freq=10_000.0, rope_scaling={"rope_type": "linear", "factor": 8.0})


def _rotary() -> Rotary:
    rotary = Rotary(CONFIG)
    for rope in rotary.tables.values():
        rope.init_buffers()
    return rotary


def _direct(rotary: Rotary, positions: torch.Tensor, dtype: torch.dtype) -> dict:
    """The rows computed for these positions alone (what every pass did before the table)."""
    out = {}
    for kind, rope in rotary.tables.items():
        cos, sin = rope(positions, dtype)
        half = sin.shape[-1] // 2
        out[kind] = cos[:, :, None], torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)[:, :, None]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_table_rows_equal_rows_computed_alone(dtype):
    rotary = _rotary()
    # a decoding batch at scattered positions, then a prompt chunk that makes the table grow,
    # then positions past the table's bound (computed per pass)
    batches = [torch.tensor([[0], [7], [255], [200]]), torch.arange(250, 700).view(1, -1),
               torch.tensor([[3], [gemma3.ROTARY_TABLE_MAX - 1]]),
               torch.tensor([[gemma3.ROTARY_TABLE_MAX + 5], [9]])]
    for positions in batches:
        ours, expected = rotary(positions, dtype), _direct(rotary, positions, dtype)
        assert set(ours) == {SLIDING, FULL}
        for kind in ours:
            for got, want in zip(ours[kind], expected[kind]):
                assert got.shape == want.shape and got.dtype == dtype
                assert torch.equal(got, want), kind
    tables = [v[1] for k, v in rotary.__dict__.items() if k.startswith("_rotary_") and str(dtype) in k]
    assert len(tables) == 2 and all(t.shape[0] == gemma3.ROTARY_TABLE_MAX for t in tables)


def test_rotary_table_follows_its_frequencies():
    rotary = _rotary()
    positions = torch.tensor([[5], [9]])
    before = rotary(positions, torch.float32)[FULL][0].clone()
    rope = rotary.tables[FULL]
    rope.inv_freq = rope.inv_freq * 2  # another tensor: the table is made again from it
    after = rotary(positions, torch.float32)[FULL][0]
    assert not torch.equal(before, after)
    assert torch.equal(after, _direct(rotary, positions, torch.float32)[FULL][0])


needs_onednn = pytest.mark.skipif(not supported(torch.empty(1)), reason="this torch has no oneDNN")


@needs_onednn
def test_few_rows_take_the_dense_weight_and_more_rows_the_packed_one():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    model = nn.Sequential(linear).eval().requires_grad_(False)
    weight, bias = linear.weight, linear.bias
    assert pack_linears(model, dense_rows=DENSE_ROWS) == 1
    packed = model[0]
    assert type(packed) is PackedLinear and packed.dense_rows == DENSE_ROWS
    assert packed.dense_weight.data_ptr() == weight.data_ptr()  # the same storage, not a copy
    assert not any("dense_weight" in k for k in model.state_dict())
    for rows in (1, 2, DENSE_ROWS, DENSE_ROWS + 1, 16):
        x = torch.randn(rows, 1, 64)
        with torch.no_grad():
            out = packed(x)
            kernel = (F.linear(x, weight, bias) if rows <= DENSE_ROWS else
                      torch.ops.mkldnn._linear_pointwise(x, packed.packed, packed.bias, "none", [], ""))
        assert torch.equal(out, kernel), rows  # the kernel the row count picks, exactly
        torch.testing.assert_close(out, F.linear(x, weight, bias), atol=1e-5, rtol=1e-5)
        assert torch.equal(packed(x), out)  # deterministic


@needs_onednn
def test_few_rows_dense_is_float32_only_and_opt_in():
    model = nn.Sequential(nn.Linear(8, 8).bfloat16(), nn.Linear(8, 8)).eval()
    pack_linears(model, dense_rows=DENSE_ROWS)
    assert model[0].dense_rows == 0 and model[0].dense_weight is None  # no bfloat16 GEMV in MKL
    assert model[1].dense_rows == DENSE_ROWS
    plain = nn.Sequential(nn.Linear(8, 8)).eval()
    pack_linears(plain)
    assert plain[0].dense_rows == 0 and plain[0].dense_weight is None
    assert "few_rows_dense" in Gemma3ForCausalLM.post_load


def _reference_attention(q, k, v, mask):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)).masked_fill(~mask, float("-inf")) if mask is not None else q @ k.transpose(-1, -2)
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("batch,length", [(1, 45), (16, 60), (16, 300)])
def test_decode_attention_serial_or_parallel_same_map_and_threads_restored(batch, length):
    torch.manual_seed(0)
    q, k, v = torch.randn(batch, 4, 1, 32), torch.randn(batch, 1, length, 32), torch.randn(batch, 1, length, 32)
    mask = torch.rand(batch, 1, 1, length) < 0.8
    mask[..., 0] = True
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = kv_cache._decode_attention(q, k, v, mask, 1.0)
        assert torch.get_num_threads() == 2
        torch.testing.assert_close(out, _reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
        with pytest.raises(RuntimeError):  # an error inside still restores the thread count
            kv_cache._decode_attention(q, k[..., :7], v, mask, 1.0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_decoding_steps_allocate_no_new_cache_tensors():
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(CONFIG).eval()
    for rope in model.model.rotary_emb.tables.values():
        rope.init_buffers()
    cache = KVCache(model.num_layers, model.kv_heads, model.head_dim, 256, windows=model.layer_windows,
                    initial_capacity=64)
    slots = [cache.allocate(), cache.allocate()]
    with torch.inference_mode():
        view = cache.view(slots, 5)
        model(torch.randint(0, CONFIG.vocab_size, (2, 5)), view)
        view.commit()
        storages = [t.data_ptr() for t in cache.keys + cache.values]
        for step in range(20):  # past the sliding window (8): its ring wraps in place
            view = cache.view(slots, 1)
            model(torch.randint(0, CONFIG.vocab_size, (2, 1)), view)
            view.commit()
        assert [t.data_ptr() for t in cache.keys + cache.values] == storages


def test_finished_sequences_leave_no_hole_in_the_decoding_slots(tmp_path):
    """A sequence in the middle of the batch finishing: the last one moves into its slot (one copy),
    every later step reads contiguous slots, and every request's tokens equal its tokens alone."""
    from generation_checkpoints import build
    from harness import load_pipeline
    from pipeserve.scheduling.generation_engine import TokenEvent

    build("gemma3", tmp_path / "gemma3")
    pipe = load_pipeline(tmp_path / "gemma3")
    try:
        engine = pipe.engine
        prompts = [pipe.encode(p) for p in ("The quick brown fox", "Hello world", "Numbers 0123")]
        lengths = [30, 8, 30]  # the middle request finishes first

        def run(prompt, n):
            return engine.submit(prompt, pipe.parameters({"max_new_tokens": n, "min_new_tokens": n}))

        def tokens(handle):
            return [e.token for e in handle if isinstance(e, TokenEvent)]

        alone = [tokens(run(p, n)) for p, n in zip(prompts, lengths)]
        steps: list[list[int]] = []
        step = engine.runner._step  # a decoding step, with or without [B, V] scores

        def recording(seqs, read):
            steps.append([s.slot for s in seqs])
            return step(seqs, read)
        engine.runner._step = recording
        moves = []
        move_down = engine.cache.move_down
        engine.cache.move_down = lambda slot: moves.append(slot) or move_down(slot)
        # submitted before the engine's next iteration, so that all three join together
        with engine.scheduler.lock:
            handles = [run(p, n) for p, n in zip(prompts, lengths)]
        together = [tokens(h) for h in handles]
        engine.runner._step = step
        engine.cache.move_down = move_down
        assert together == alone
        three = [s for s in steps if len(s) == 3]
        two = [s for s in steps if len(s) == 2]
        assert three and two and moves, (steps, moves)
        assert all(s == list(range(s[0], s[0] + len(s))) for s in steps), steps
    finally:
        pipe.close()


def test_move_down_copies_a_sequence_into_the_lowest_free_slot_below():
    cache = KVCache(2, 1, 4, 64, windows=[8, None], initial_slots=4, initial_capacity=16)
    slots = [cache.allocate() for _ in range(3)]
    for slot, length in zip(slots, (5, 12, 11)):
        view = cache.view([slot], length)
        for layer in range(2):
            k = torch.full((1, 1, length, 4), float(slot + 1)) + torch.arange(length)[None, None, :, None]
            view.attend(layer, torch.zeros(1, 2, length, 4), k, -k, window=cache.windows[layer])
        view.commit()
    assert cache.move_down(2) is None  # nothing free below slot 2
    expected = [(cache.keys[layer][2].clone(), cache.values[layer][2].clone()) for layer in range(2)]
    cache.free(1)
    assert cache.move_down(0) is None and cache.move_down(2) == 1
    assert cache.lengths == {0: 5, 1: 11} and 2 in cache._free
    for layer, (k, v) in enumerate(expected):
        kept = min(11, cache.keys[layer].shape[2])  # the ring (window 8) holds its last 8 positions
        assert torch.equal(cache.keys[layer][1, :, :kept], k[:, :kept])
        assert torch.equal(cache.values[layer][1, :, :kept], v[:, :kept])


def test_serial_section_runs_small_work_on_one_thread_and_restores_the_team():
    from pipeserve.layers.serial import SerialSection

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        with SerialSection(True) as section:
            seen.append(torch.get_num_threads())
            seen.append(section.team(torch.get_num_threads))
            seen.append(torch.get_num_threads())
        seen.append(torch.get_num_threads())
        with SerialSection(False) as section:
            seen.append(torch.get_num_threads())
        assert seen == [1, 2, 1, 2, 2]
        with pytest.raises(ValueError):
            with SerialSection(True) as section:
                section.team(lambda: (_ for _ in ()).throw(ValueError("inside the team")))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_row_int8_outputs_are_the_same_serial_or_split(monkeypatch):
    from pipeserve.layers import row_int8

    if not row_int8.available():
        pytest.skip("no oneDNN int8 kernel (VNNI)")
    torch.manual_seed(0)
    linear = row_int8.RowInt8Linear(nn.Linear(4096, 96))
    x = torch.randn(16, 4096) * 3  # 65536 elements: ATen splits them when allowed to
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(row_int8, "SERIAL_QUANTIZE_ROWS", 16)  # on this thread
        serial = linear.project_with_error(x)
        monkeypatch.setattr(row_int8, "SERIAL_QUANTIZE_ROWS", 0)  # split over the team
        split = linear.project_with_error(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(serial[0], split[0])
    torch.testing.assert_close(serial[1], split[1], rtol=1e-6, atol=0)


def test_a_serial_section_on_the_lane_leaves_later_threads_single_threaded():
    """The lane's sections switch only the lane thread's own team: torch.set_num_threads also
    sets the default of threads started later, and restoring the lane's count through it made
    every later thread start an OpenMP team (the compute lane's invariant, test_compute_lane)."""
    import threading

    from pipeserve.layers.serial import SerialSection
    from pipeserve.scheduling import compute

    lane = compute.install(max(2, torch.get_num_threads()))

    def later_thread_default() -> int:
        seen = {}
        worker = threading.Thread(target=lambda: seen.update(n=torch.get_num_threads()))
        worker.start()
        worker.join()
        return seen["n"]

    def section_on_the_lane() -> list[int]:
        with SerialSection(True) as section:
            return [torch.get_num_threads(), section.team(torch.get_num_threads)]

    before = later_thread_default()
    inside = lane.call(section_on_the_lane)
    assert lane.call(torch.get_num_threads) == lane.threads
    if lane.threads > 1:
        assert inside == [1, lane.threads]
    assert later_thread_default() == before == 1
