"""The KV cache's rings for sliding-window layers (layers/kv_cache.py), against attention over
every key with the window mask: sequences of different lengths in one pass, prompt chunks
shorter and longer than the ring on top of a wrapped ring, slots added after the rings wrapped,
a copied slot, and memory that stops growing at the window on the ring layer only."""
from __future__ import annotations

import torch

from pipeserve.layers.kv_cache import KVCache

WINDOW, HEADS, KV_HEADS, DIM = 4, 4, 2, 8
WINDOWS = [WINDOW, None]  # layer 0 keeps a ring, layer 1 everything


def _reference(q, keys, values, start, window):
    """q [H, T, D] at positions start.., keys/values [Hkv, L, D] for positions 0..L-1."""
    groups = HEADS // KV_HEADS
    k, v = keys.repeat_interleave(groups, 0), values.repeat_interleave(groups, 0)
    scores = q @ k.transpose(-1, -2) * DIM ** -0.5  # [H, T, L]
    query = torch.arange(start, start + q.shape[1])[:, None]
    key = torch.arange(keys.shape[1])[None, :]
    allowed = (key <= query) & ((query - key < window) if window else True)
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


class Tracker:
    """Feeds random q/k/v through the cache and keeps every key to check each output."""

    def __init__(self):
        self.cache = KVCache(len(WINDOWS), KV_HEADS, DIM, 256, initial_slots=1, initial_capacity=2, windows=WINDOWS)
        self.keys: dict[int, list[list[torch.Tensor]]] = {}
        self.generator = torch.Generator().manual_seed(0)

    def new(self) -> int:
        slot = self.cache.allocate()
        self.keys[slot] = [[torch.empty(KV_HEADS, 0, DIM)] * 2 for _ in WINDOWS]
        return slot

    def step(self, slots: list[int], T: int) -> None:
        view = self.cache.view(slots, T)
        starts = [self.cache.lengths[s] for s in slots]
        for layer, window in enumerate(WINDOWS):
            q, k, v = (torch.randn(len(slots), h, T, DIM, generator=self.generator) for h in (HEADS, KV_HEADS, KV_HEADS))
            out = view.attend(layer, q, k, v, window=window)
            for b, (slot, start) in enumerate(zip(slots, starts)):
                kept_k, kept_v = self.keys[slot][layer]
                kept_k, kept_v = torch.cat([kept_k, k[b]], 1), torch.cat([kept_v, v[b]], 1)
                self.keys[slot][layer] = [kept_k, kept_v]
                expected = _reference(q[b], kept_k, kept_v, start, window)
                assert torch.allclose(out[b], expected, atol=1e-5), (layer, slot, start, T)
        view.commit()


def test_rings_match_full_attention_with_the_window():
    t = Tracker()
    a = t.new()
    t.step([a], 3)   # inside the window
    t.step([a], 7)   # a chunk longer than the ring, on top of a partly filled one
    for _ in range(5):
        t.step([a], 1)  # wraps
    b = t.new()  # a slot added after the ring wrapped: the rings are copied into more slots
    t.step([b], 2)
    t.step([b, a], 1)  # b inside its window, a past it, in one pass (b first: slot order differs)
    t.step([a, b], 9)  # chunks longer than the ring for both, starting at different positions
    for _ in range(6):
        t.step([b, a], 1)
    c = t.new()
    t.cache.copy_slot(a, c)  # num_return_sequences: the copy continues exactly as the original
    t.keys[c] = [list(pair) for pair in t.keys[a]]
    for _ in range(3):
        t.step([a, c, b], 1)
    assert t.cache.keys[0].shape[2] == WINDOW
    assert t.cache.keys[1].shape[2] >= max(t.cache.lengths.values())


def test_ring_layer_memory_stops_at_the_window():
    t = Tracker()
    a = t.new()
    sizes = []
    for _ in range(40):
        t.step([a], 1)
        sizes.append((t.cache.keys[0].numel(), t.cache.keys[1].numel()))
    ring, full = zip(*sizes)
    assert max(ring) == t.cache.slots * KV_HEADS * WINDOW * DIM and ring[-20:] == (max(ring),) * 20
    assert full[-1] > full[10], "the full layer grows with the sequence"
    t.cache.free(a)
    assert t.cache.memory_bytes() == 0
