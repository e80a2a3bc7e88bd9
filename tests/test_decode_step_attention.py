"""A decoding step's attention with less around the GEMMs (issue 15): all of a key/value head's
query heads in one batched GEMM against keys read as views of the cache, the mask added as
scores made once per step, and Gemma's norms and rotation with fewer tensors. The step's results
equal the previous formulation bit for bit and the reference attention at parity level, at 1
and 16 rows, with ragged lengths, sliding-window rings that wrap, and slots out of order."""
import pytest
import torch
import torch.nn.functional as F

from pipeserve.layers import kv_cache
from pipeserve.layers.kv_cache import KVCache
from pipeserve.models.gemma3 import RMSNorm, rotate


def _previous_decode_attention(q, k, v, mask, scale):
    """main's decoding attention before this change (a 4-d matmul, torch.where on the mask)."""
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    scores = q.reshape(B, Hkv, H // Hkv, D) @ k.transpose(-1, -2)
    if scale != 1.0:
        scores = scores * scale
    if mask is not None:
        scores = torch.where(mask, scores, float("-inf"))
    return (scores.softmax(-1) @ v).reshape(B, H, 1, D)


@pytest.mark.parametrize("batch,heads,kv_heads,length,scale", [
    (1, 4, 1, 45, 1.0), (16, 4, 1, 60, 1.0), (16, 4, 1, 300, 0.0625), (3, 8, 2, 33, 0.125)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_attention_equals_the_previous_formulation_bitwise(batch, heads, kv_heads, length, scale, masked, dtype):
    torch.manual_seed(0)
    D = 32
    # as a model hands them over: q a transposed slice of the normed q/k heads, k and v slices
    # of a larger cache
    qk = torch.randn(batch, 1, heads + kv_heads, D, dtype=dtype)
    q = qk[:, :, :heads].transpose(1, 2)
    cache_k = torch.randn(batch + 2, kv_heads, length + 7, D, dtype=dtype)
    cache_v = torch.randn(batch + 2, kv_heads, length + 7, D, dtype=dtype)
    k, v = cache_k[1:batch + 1, :, :length], cache_v[1:batch + 1, :, :length]
    mask = None
    if masked:
        mask = torch.rand(batch, 1, 1, length) < 0.7
        mask[..., 0] = True
    ours = kv_cache._decode_attention(q, k, v, mask, scale)
    assert ours.shape == (batch, heads, 1, D) and ours.dtype == dtype
    assert torch.equal(ours, _previous_decode_attention(q, k, v, mask, scale))


def _reference(q, keys, values, scale):
    """One sequence's attention by SDPA over the keys it may see, [1, H, 1, D]."""
    return F.scaled_dot_product_attention(q, keys[None], values[None], scale=scale, enable_gqa=True)


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("order", ["contiguous", "shuffled"])
def test_decoding_steps_match_the_reference_with_ragged_lengths_and_rings(batch, order):
    torch.manual_seed(1)
    H, Hkv, D, window, scale = 4, 1, 16, 8, 0.25
    windows = [window, None, window]  # two sliding layers (rings) and a global one
    cache = KVCache(len(windows), Hkv, D, 128, windows=windows, initial_capacity=32)
    if order == "contiguous":
        slots = [cache.allocate() for _ in range(batch)]  # 0 .. batch-1: keys read as views
    else:  # a hole and the reverse order: keys gathered
        slots = [cache.allocate() for _ in range(batch + 1)]
        cache.free(slots.pop(1))
        slots = slots[::-1]
    history = {(s, layer): ([], []) for s in slots for layer in range(len(windows))}
    prompt = {s: 1 + (3 * i) % 11 for i, s in enumerate(slots)}  # ragged: 1..11 tokens
    with torch.inference_mode():
        for s in slots:
            view = cache.view([s], prompt[s])
            for layer in range(len(windows)):
                k, v = torch.randn(1, Hkv, prompt[s], D), torch.randn(1, Hkv, prompt[s], D)
                view.attend(layer, torch.randn(1, H, prompt[s], D), k, v, scale=scale, window=windows[layer])
                history[s, layer][0].extend(k[0].unbind(1))
                history[s, layer][1].extend(v[0].unbind(1))
            view.commit()
        storages = [t.data_ptr() for t in cache.keys + cache.values]
        for step in range(14):  # every ring wraps (8), some sequences later than others
            view = cache.view(slots, 1)
            for layer, w in enumerate(windows):
                q, k, v = torch.randn(batch, H, 1, D), torch.randn(batch, Hkv, 1, D), torch.randn(batch, Hkv, 1, D)
                out = view.attend(layer, q, k, v, scale=scale, window=w)
                assert out.shape == (batch, H, 1, D)
                for i, s in enumerate(slots):
                    keys, values = history[s, layer]
                    keys.append(k[i, :, 0])
                    values.append(v[i, :, 0])
                    seen = slice(-w if w else 0, None)
                    expected = _reference(q[i:i + 1], torch.stack(keys[seen], 1), torch.stack(values[seen], 1), scale)
                    torch.testing.assert_close(out[i:i + 1], expected, atol=1e-5, rtol=1e-5)
            view.commit()
            assert [t.data_ptr() for t in cache.keys + cache.values] == storages  # no new cache tensors


def test_a_steps_masks_are_made_once_per_cache_shape(monkeypatch):
    made = []
    additive = kv_cache._additive

    def counted(mask, dtype):
        made.append(tuple(mask.shape))
        return additive(mask, dtype)
    monkeypatch.setattr(kv_cache, "_additive", counted)
    windows = [4, None, 4, None, 4]
    cache = KVCache(len(windows), 1, 8, 64, windows=windows, initial_capacity=16)
    slots = [cache.allocate(), cache.allocate()]
    with torch.inference_mode():
        for s, n in zip(slots, (2, 9)):  # ragged, one ring not yet full: the step needs masks
            view = cache.view([s], n)
            for layer in range(len(windows)):
                view.attend(layer, torch.randn(1, 2, n, 8), torch.randn(1, 1, n, 8), torch.randn(1, 1, n, 8),
                            window=windows[layer])
            view.commit()
        made.clear()
        view = cache.view(slots, 1)
        for layer, w in enumerate(windows):
            view.attend(layer, torch.randn(2, 2, 1, 8), torch.randn(2, 1, 1, 8), torch.randn(2, 1, 1, 8), window=w)
    assert len(made) == 2  # one for the rings (wrapped: 4 keys), one for the global layers (10 keys)
    assert sorted(made) == [(2, 1, 1, 4), (2, 1, 1, 10)]


def test_gemma_norm_and_rotation_equal_their_reference_bitwise():
    torch.manual_seed(2)
    norm = RMSNorm(64, 1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    for shape in [(1, 1, 64), (16, 1, 64), (2, 7, 64)]:
        x = torch.randn(shape) * 30
        with torch.inference_mode():
            assert torch.equal(norm.forward(x), F.rms_norm(x, (64,), 1.0 + norm.weight.float(), 1e-6))
            low = x.bfloat16()
            assert torch.equal(norm.forward(low), F.rms_norm(low.float(), (64,), 1.0 + norm.weight.float(),
                                                             1e-6).type_as(low))
    x, cos, sin = torch.randn(16, 1, 5, 32), torch.randn(16, 1, 1, 32), torch.randn(16, 1, 1, 32)
    x1, x2 = x.chunk(2, dim=-1)
    sin1, sin2 = sin.chunk(2, dim=-1)
    # Llama's x * cos + rotate_half(x) * sin with sin_signed = [-sin1, sin2]
    expected = x * cos + torch.cat([-x2, x1], dim=-1) * torch.cat([sin1, sin2], dim=-1)
    assert torch.equal(rotate(x, cos, torch.cat([-sin1, sin2], dim=-1)), expected)
