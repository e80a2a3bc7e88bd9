"""Our key/value cache: one slot per sequence, so that sequences can join and leave a running
batch between decoding steps without touching the others.

Per layer the cache holds K and V as [slots, kv_heads, capacity, head_dim] on that layer's
device. A sequence owns one slot and a length; a forward pass over some sequences gets a
`CacheView` that writes the new keys/values at each sequence's own positions and attends over
each sequence's own prefix (a boolean mask hides other sequences' longer tails). Slots and
capacity grow by doubling up to the configured bounds, and the tensors are dropped when the
last sequence leaves so an idle model holds no cache memory.

A sliding-window layer (`windows[layer]`, Gemma 3's local layers, Mistral's) keeps a ring of
`window` positions per slot instead: position p lives at index p % window, so a long generation
does not grow those layers' memory. A query at position q sees the keys q - window + 1 .. q, which
are exactly what the ring holds after q is written; a prompt chunk attends over the ring's older
entries and its own new keys together, then leaves its last `window` keys in the ring.

A decoding step on the CPU (one new token per sequence) is planned once for every layer of one
cache shape: the rows its keys are written to (one index_copy_ per layer), the keys it reads (a
view when the slots are contiguous) and its mask as scores to add; each layer then runs one
batched GEMM per key/value head for all its query heads, softmax and one more GEMM; or, for a
model that takes pipeserve's kernels, the whole attention block after its projection in one
native call over the same plan (`attend_step_native`, kernels/decode_attention.cpp).

Models call `view.attend(layer_idx, q, k, v, ...)` and never see the layout; `FullAttention`
is the same interface without a cache (one causal pass, used for logits parity tests).

Longer than 450 lines: the cache, one pass's view of it and the decoding step's plan share the
slot, row and mask bookkeeping, and the step's two paths (torch's GEMMs, the native block) read
the same plan; split apart, each would reach into the others' internals.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import QueueFull
from ..kernels import library
from .serial import SerialSection


# Key and value elements (B * Hkv * L * D, both) below which a decoding step's attention runs on
# the calling thread alone (layers/serial.py: softmax forks even for 4 rows, the batched GEMMs
# by sequence). Measured on our 2-core Xeon, 2 threads -> 1, loaded (load 2-4): 1 sequence, 45
# keys 268 -> 8.8 us per layer; 16 sequences, 60 keys 852 -> 69 us; 16 sequences, 512 keys 540 ->
# 1047 us. Quiet (load ~1, Gemma 3 270M float32 layers per step at ~100 keys, best of 6): 1
# sequence 27.5 serial against 27.2 ms split, 16 sequences 54.8 against 52.3. So one sequence's
# attention (up to 512 keys of 256 dims) runs serially, a batch's splits.
SERIAL_ATTENTION_ELEMENTS = 1 << 18


def _decode_attention(q, k, v, mask, scale):
    """One query per sequence, q [B, H, 1, D] over k, v [B, Hkv, L, D] with a boolean mask
    [B, 1, 1, L] (True = attend) or None: `_step_attention` on the same tensors."""
    B, Hkv, L, D = k.shape
    with SerialSection(_serial_attention(B, Hkv, L, D)):
        return _step_attention(q, k.reshape(B * Hkv, L, D), v.reshape(B * Hkv, L, D),
                               _step_bias(mask, q.dtype, B, Hkv), scale)


def _serial_attention(batch: int, kv_heads: int, length: int, head_dim: int) -> bool:
    """A decoding step's attention over this many keys and values runs on the calling thread."""
    return 2 * batch * kv_heads * length * head_dim < SERIAL_ATTENTION_ELEMENTS


def _native_step() -> bool:
    """The native decoding step applies: the kernels are built, with AVX-512 (170 keys, 2 threads:
    67 us in the portable loops, 23 us on AVX-512; torch's path takes about as long as the
    former, so without AVX-512 it stays)."""
    return library.available() and library.isa() == "avx512"


def _step_bias(mask: torch.Tensor | None, dtype: torch.dtype, batch: int, kv_heads: int) -> torch.Tensor | None:
    """A decoding step's boolean mask [B or 1, 1, 1, L] as _step_attention's bias [B * Hkv, 1, L]."""
    if mask is None:
        return None
    L = mask.shape[-1]
    # contiguous: the native step (attend_step_native) reads it row by row
    return _additive(mask, dtype).expand(batch, kv_heads, 1, L).reshape(batch * kv_heads, 1, L).contiguous()


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = attend) as scores to add: 0 where it attends, -inf where not.
    s + 0 is s and s + -inf is -inf exactly, so adding it in place equals
    torch.where(mask, s, -inf) bit for bit, without a new tensor per layer."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask.logical_not(), float("-inf"))


def _step_attention(q, keys, values, bias, scale):
    """A decoding step's attention as two batched GEMMs: q [B, H, 1, D] (query head h reads
    key/value head h // groups), keys and values [B * Hkv, L, D] (views of the cache when the
    slots are contiguous), bias [B * Hkv, 1, L] (0 or -inf, _additive) or None -> [B, H, 1, D].

    On CPU this beats SDPA's flash kernel, whose parallel sections cost more than the work at
    q length 1 (and stall on busy cores). The grouped query heads of a key/value head are the
    rows of one GEMM against its keys: no repeat of the keys, no 4-d matmul folding. The same
    GEMMs, scale, mask and softmax as before (tests/test_decode_step_attention.py: bit for bit)."""
    B, H, _, D = q.shape
    n = keys.shape[0]
    scores = torch.bmm(q.reshape(n, B * H // n, D), keys.transpose(1, 2))  # [B * Hkv, groups, L]
    scale = scale if scale is not None else D ** -0.5
    if scale != 1.0:  # a model that folded the scale into its queries passes 1.0
        scores.mul_(scale)
    if bias is not None:
        scores.add_(bias)
    return torch.bmm(scores.softmax(-1), values).view(B, H, 1, D)


def _sdpa(q, k, v, mask, scale, is_causal=False):
    # q: [B, H, T, D]; k, v: [B, Hkv, L, D]; mask: [B, 1, T, L] bool (True = attend) or None.
    if q.shape[2] == 1 and q.device.type == "cpu":
        return _decode_attention(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


def _window_mask(query_pos: torch.Tensor, key_len: int, lengths: torch.Tensor | None,
                 window: int | None) -> torch.Tensor:
    """[B, 1, T, L] True where query at absolute position query_pos[b, t] may see key j."""
    keys = torch.arange(key_len, device=query_pos.device)
    q = query_pos[:, None, :, None]
    allowed = keys[None, None, None, :] <= q
    if window:
        # transformers' sliding window: a query sees the last `window` keys including itself.
        allowed &= (q - keys[None, None, None, :]) < window
    if lengths is not None:
        allowed &= keys[None, None, None, :] < lengths[:, None, None, None]
    return allowed


class FullAttention:
    """No cache: attention over the `T` tokens of this pass only, causally."""

    def __init__(self, batch: int, length: int, device: torch.device | str):
        self.positions = torch.arange(length, device=device).expand(batch, length)
        self._masks: dict[int | None, torch.Tensor] = {}

    def attend(self, layer: int, q, k, v, *, scale: float | None = None, window: int | None = None):
        if not window or window >= q.shape[2]:
            return _sdpa(q, k, v, None, scale, is_causal=q.shape[2] > 1)
        if window not in self._masks:
            self._masks[window] = _window_mask(self.positions.to(q.device), q.shape[2], None, window)
        return _sdpa(q, k, v, self._masks[window].to(q.device), scale)


class KVCache:
    """Slot cache for one model. Not thread-safe: the generation engine's thread owns it."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, max_length: int, *,
                 dtype: torch.dtype = torch.float32, devices: Sequence[torch.device | str] | torch.device | str = "cpu",
                 max_slots: int = 64, initial_slots: int = 4, initial_capacity: int = 64,
                 windows: Sequence[int | None] | None = None):
        if isinstance(devices, (str, torch.device)):
            devices = [devices] * num_layers
        self.devices = [torch.device(d) for d in devices]
        # per layer: the sliding window whose ring it keeps, or None for the whole prefix
        self.windows = [w or None for w in windows] if windows is not None else [None] * num_layers
        if len(self.windows) != num_layers:
            raise ValueError(f"{len(self.windows)} windows for {num_layers} layers")
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.max_length, self.max_slots, self.dtype = max_length, max_slots, dtype
        self._initial_slots, self._initial_capacity = initial_slots, initial_capacity
        self.lengths: dict[int, int] = {}  # slot -> tokens cached
        self._free: list[int] = []
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.slots = 0
        self.capacity = 0
        self.peak_bytes = 0  # high-water mark of memory_bytes(), for tests and metrics

    # ---- bookkeeping -------------------------------------------------------------------
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def allocate(self) -> int:
        """A free slot for a new sequence (length 0)."""
        if not self._free:
            if self.slots >= self.max_slots:
                raise QueueFull(f"all {self.max_slots} cache slots are in use")
            self._resize(max(self._initial_slots, min(self.max_slots, self.slots * 2)),
                         max(self.capacity, self._initial_capacity))
        slot = self._free.pop(0)
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        if self.lengths.pop(slot, None) is None:
            return
        self._free.append(slot)
        self._free.sort()
        if not self.lengths:  # idle: give the memory back
            self.keys, self.values, self.slots, self.capacity, self._free = [], [], 0, 0, []

    def copy_slot(self, source: int, target: int) -> None:
        """Duplicates a sequence's cache (num_return_sequences share one prompt pass)."""
        n = self.lengths[source]
        for cache in self.keys + self.values:
            kept = min(n, cache.shape[2])  # a ring holds at most its window
            cache[target, :, :kept] = cache[source, :, :kept]
        self.lengths[target] = n

    def move_down(self, slot: int) -> int | None:
        """Moves a sequence into the lowest free slot below its own (its keys and values copied
        once, its old slot freed): -> the new slot, or None when no slot below is free.

        Why: a decoding step over slots a..b in order reads every layer's keys and values as a
        view; any hole (a sequence in the middle finished) makes it gather them instead, a copy
        of the whole batch's cache per layer and step (16 sequences at 512 positions: 16 MiB per
        layer) until a new request fills the hole. Moving the last sequence down costs one
        sequence's copy, once."""
        if not self._free or self._free[0] >= slot or slot not in self.lengths:
            return None
        lower = self._free.pop(0)
        self.copy_slot(slot, lower)
        self.free(slot)
        return lower

    def layer_capacity(self, layer: int, capacity: int) -> int:
        """Positions a layer's tensor holds per slot: a ring stops growing at its window. It
        reaches the window before any sequence passes it, so no ring wraps at a smaller size."""
        window = self.windows[layer]
        return min(capacity, window) if window else capacity

    def _resize(self, slots: int, capacity: int) -> None:
        capacity = min(capacity, self.max_length)
        new_k, new_v = [], []
        for layer, device in enumerate(self.devices):
            positions = self.layer_capacity(layer, capacity)
            if self.slots == slots and self.keys and self.keys[layer].shape[2] == positions:
                new_k.append(self.keys[layer])  # a full ring: nothing to grow
                new_v.append(self.values[layer])
                continue
            shape = (slots, self.kv_heads, positions, self.head_dim)
            k = torch.zeros(shape, dtype=self.dtype, device=device)
            v = torch.zeros(shape, dtype=self.dtype, device=device)
            if self.slots:
                held = self.keys[layer].shape[2]
                k[: self.slots, :, :held] = self.keys[layer]
                v[: self.slots, :, :held] = self.values[layer]
            new_k.append(k)
            new_v.append(v)
        self._free.extend(range(self.slots, slots))
        self.keys, self.values, self.slots, self.capacity = new_k, new_v, slots, capacity
        self.peak_bytes = max(self.peak_bytes, self.memory_bytes())

    def view(self, slots: Sequence[int], new_tokens: int) -> "CacheView":
        """The cache seen by one forward pass adding `new_tokens` tokens to each of `slots`."""
        need = max(self.lengths[s] for s in slots) + new_tokens
        if need > self.max_length:
            raise ValueError(f"sequence would reach {need} tokens; the cache holds {self.max_length}")
        if need > self.capacity:
            capacity = self.capacity
            while capacity < need:
                capacity *= 2
            self._resize(self.slots, capacity)
        return CacheView(self, list(slots), new_tokens)


@dataclass
class _StepPlan:
    rows: torch.Tensor  # [B * Hkv] rows of the cache seen as [S * Hkv * C, D] the step writes
    first: int | None  # the first of contiguous slots, else None (read by gathering `slots`)
    slots: torch.Tensor  # [B] long
    batch: int
    length: int  # keys read per sequence
    bias: torch.Tensor | None  # [B * Hkv, 1, length]: 0 where the query attends, -inf where not
    serial: bool  # small enough to run on this thread alone (SERIAL_ATTENTION_ELEMENTS)

    def read(self, cache: torch.Tensor) -> torch.Tensor:
        """[B * Hkv, length, D] keys (or values) of the step's sequences: a view of `cache` over
        contiguous slots, else a gather."""
        S, Hkv, C, D = cache.shape
        if self.first is not None:
            return cache.as_strided((self.batch * Hkv, self.length, D), (C * D, D, 1),
                                    cache.storage_offset() + self.first * Hkv * C * D)
        return cache[self.slots, :, :self.length].reshape(self.batch * Hkv, self.length, D)


@dataclass
class _Placement:
    slots: torch.Tensor  # [B] long
    starts: torch.Tensor  # [B] long, tokens cached before this pass
    contiguous: slice | None  # slots a..b in order -> read keys as a view, not a gather


class CacheView:
    """One forward pass's window into the cache. Positions come from each sequence's length."""

    def __init__(self, cache: KVCache, slots: list[int], new_tokens: int):
        self.cache = cache
        self.slot_list = slots
        self.new_tokens = new_tokens
        self.start_list = [cache.lengths[s] for s in slots]
        self.key_len = max(self.start_list) + new_tokens
        self._placements: dict[torch.device, _Placement] = {}
        self._masks: dict[tuple, torch.Tensor | None] = {}
        self._uniform_start = self.start_list[0] if len(set(self.start_list)) == 1 else None
        first = slots[0]
        self._contiguous = slice(first, first + len(slots)) if slots == list(range(first, first + len(slots))) else None
        self.positions = (torch.tensor(self.start_list)[:, None] + torch.arange(new_tokens)[None, :])  # [B, T]

    def _placement(self, device: torch.device) -> _Placement:
        if device not in self._placements:
            self._placements[device] = _Placement(torch.tensor(self.slot_list, device=device),
                                                  torch.tensor(self.start_list, device=device), self._contiguous)
        return self._placements[device]

    def _mask(self, device: torch.device, window: int | None) -> torch.Tensor | None:
        key = (device, window)
        if key not in self._masks:
            uniform = len(set(self.start_list)) == 1
            if uniform and self.new_tokens == 1 and (not window or window >= self.key_len):
                self._masks[key] = None  # every sequence sees its whole prefix
            else:
                p = self._placement(device)
                query_pos = p.starts[:, None] + torch.arange(self.new_tokens, device=device)[None, :]
                self._masks[key] = _window_mask(query_pos, self.key_len, p.starts + self.new_tokens, window)
        return self._masks[key]

    def attend(self, layer: int, q, k, v, *, scale: float | None = None, window: int | None = None):
        """Stores k, v ([B, Hkv, T, D]) and attends q ([B, H, T, D]) over each sequence's prefix."""
        cache_k, cache_v = self.cache.keys[layer], self.cache.values[layer]
        wraps = self._wraps(layer, window)
        if self.new_tokens == 1 and cache_k.device.type == "cpu":
            return self._attend_step(cache_k, cache_v, q, k, v, scale, window, wraps)
        if wraps:
            return self._attend_ring(cache_k, cache_v, q, k, v, scale)
        p = self._placement(cache_k.device)
        T = self.new_tokens
        if T == 1:
            self._write_step(cache_k, cache_v, k, v, ring=False)
        else:
            for i, (slot, start) in enumerate(zip(self.slot_list, self.start_list)):
                cache_k[slot, :, start:start + T] = k[i]
                cache_v[slot, :, start:start + T] = v[i]
        L = self.key_len
        if p.contiguous is not None:
            keys, values = cache_k[p.contiguous, :, :L], cache_v[p.contiguous, :, :L]
        else:
            keys, values = cache_k[p.slots, :, :L], cache_v[p.slots, :, :L]
        if not any(self.start_list) and (not window or window >= L):
            # fresh prompts of one length
            return _sdpa(q, keys, values, None, scale, is_causal=T > 1)
        return _sdpa(q, keys, values, self._mask(cache_k.device, window), scale)

    def _wraps(self, layer: int, window: int | None) -> bool:
        """This pass's keys overrun the layer's ring (a sliding-window layer whose sequences
        outgrew it), which only a query of that same window may read."""
        ring = self.cache.windows[layer]
        wraps = bool(ring) and self.key_len > self.cache.keys[layer].shape[2]
        if wraps and window != ring:
            raise ValueError(f"layer {layer} attends with window {window}; its cache keeps {ring}")
        return wraps

    def attend_step_native(self, layer: int, qkv: torch.Tensor, qk_scale: torch.Tensor, eps: float,
                           cos: torch.Tensor, sin_signed: torch.Tensor, window: int | None) -> torch.Tensor | None:
        """Gemma's attention block after its q/k/v projection, for a decoding step, in one native
        call (kernels/decode_attention.cpp): qkv [B, 1, (H + 2 Hkv) D] -> [B, 1, H D], the new
        keys and values stored. q/k are RMS-normed with `qk_scale` [H + Hkv, D] rows and rotated
        by cos / sin_signed [B, 1, 1, D]; keys, mask and rows are this step's plan, as `attend`
        uses them. None, touching nothing, where it does not apply (not a one-token step, not
        a float32 CPU cache, kernels not built or without AVX-512): the caller takes its torch path."""
        cache_k, cache_v = self.cache.keys[layer], self.cache.values[layer]
        if self.new_tokens != 1 or cache_k.device.type != "cpu" or cache_k.dtype != torch.float32 \
                or qkv.dtype != torch.float32 or not qkv.is_contiguous() or not _native_step():
            return None
        wraps = self._wraps(layer, window)
        plan = self._step_plan(cache_k, window, wraps)
        B = qkv.shape[0]
        return torch.ops.pipeserve.decode_attention(
            qkv, qk_scale, eps, cos.reshape(B, -1).contiguous(), sin_signed.reshape(B, -1).contiguous(),
            cache_k, cache_v, plan.rows, plan.slots, plan.length, plan.bias)

    def _step_plan(self, cache: torch.Tensor, window: int | None, wraps: bool) -> "_StepPlan":
        """What every layer of one cache shape does in a decoding step, made once per step:
        where each sequence's new key goes, which keys each reads, the mask as scores to add,
        and whether the attention runs on this thread alone. A wrapped ring reads its whole
        ring (after the write it holds exactly the query's window); other layers read the
        first key_len positions."""
        S, Hkv, C, D = cache.shape
        key = ("step", cache.device, S, C, window, wraps)
        plan = self._masks.get(key)
        if plan is None:
            p = self._placement(cache.device)
            L = C if wraps else self.key_len
            mask = self._ring_mask(cache.device, C) if wraps else self._mask(cache.device, window)
            B = len(self.slot_list)
            first = None if p.contiguous is None else p.contiguous.start
            plan = _StepPlan(self._write_rows(cache, wraps), first, p.slots, B, L,
                             _step_bias(mask, cache.dtype, B, Hkv), _serial_attention(B, Hkv, L, D))
            self._masks[key] = plan
        return plan

    def _attend_step(self, cache_k, cache_v, q, k, v, scale, window, wraps):
        """A decoding step (one new token per sequence) on the CPU: two index_copy_ writes, the
        keys read as views of the cache, one attention over all query heads (_step_attention)."""
        plan = self._step_plan(cache_k, window, wraps)
        D = cache_k.shape[-1]
        k, v = k.reshape(-1, D), v.reshape(-1, D)
        if k.dtype != cache_k.dtype:
            k, v = k.to(cache_k.dtype), v.to(cache_v.dtype)
        cache_k.view(-1, D).index_copy_(0, plan.rows, k)
        cache_v.view(-1, D).index_copy_(0, plan.rows, v)
        with SerialSection(plan.serial):
            return _step_attention(q, plan.read(cache_k), plan.read(cache_v), plan.bias, scale)

    def _write_rows(self, cache: torch.Tensor, ring: bool) -> torch.Tensor:
        """[B * Hkv] rows of `cache` seen as [slots * Hkv * positions, D] where a decoding step
        writes each sequence's new key (position start, or start % positions in a ring): made
        once per pass for every layer of that shape, so that each layer's write is one
        index_copy_ (no gather, no per-layer index arithmetic)."""
        S, Hkv, C, _ = cache.shape
        key = ("rows", cache.device, S, C, ring)
        if key not in self._masks:
            p = self._placement(cache.device)
            where = p.starts % C if ring else p.starts
            rows = (p.slots[:, None] * Hkv + torch.arange(Hkv, device=cache.device)[None, :]) * C + where[:, None]
            self._masks[key] = rows.reshape(-1)
        return self._masks[key]

    def _write_step(self, cache_k, cache_v, k, v, ring: bool) -> None:
        """Stores one decoding step's k, v [B, Hkv, 1, D] at each sequence's position."""
        rows = self._write_rows(cache_k, ring)
        D = cache_k.shape[-1]
        k, v = k.reshape(-1, D), v.reshape(-1, D)
        if k.dtype != cache_k.dtype:
            k, v = k.to(cache_k.dtype), v.to(cache_v.dtype)
        cache_k.view(-1, D).index_copy_(0, rows, k)
        cache_v.view(-1, D).index_copy_(0, rows, v)

    def _ring_mask(self, device: torch.device, R: int) -> torch.Tensor | None:
        """The mask every ring layer of this pass shares (computed once per pass).

        One new token: [B, 1, 1, R] over the ring after the write; None once every sequence has
        filled its ring (it then holds exactly the query's window). A chunk: [B, 1, T, R + T] over
        the ring's entries (before the write) and the chunk's keys, by absolute position."""
        key = ("ring", device, R)
        if key not in self._masks:
            p = self._placement(device)
            index, T = torch.arange(R, device=device), self.new_tokens
            starts = p.starts[:, None]  # [B, 1]
            if T == 1:
                written = index[None, :] <= starts  # [B, R]: a short sequence has not filled it
                self._masks[key] = None if min(self.start_list) + 1 >= R else written[:, None, None, :]
            else:
                # entry i holds the latest position p < start with p % R == i (none if i >= start)
                held = index[None, :] + R * torch.div(starts - 1 - index[None, :], R, rounding_mode="floor")
                key_pos = torch.cat([held, starts + torch.arange(T, device=device)[None, :]], dim=1)  # [B, R + T]
                valid = torch.cat([index[None, :] < starts, torch.ones_like(key_pos[:, R:], dtype=torch.bool)], dim=1)
                query_pos = starts + torch.arange(T, device=device)[None, :]  # [B, T]
                delta = query_pos[:, :, None] - key_pos[:, None, :]  # [B, T, R + T]
                self._masks[key] = (valid[:, None, :] & (delta >= 0) & (delta < R))[:, None]
        return self._masks[key]

    def _attend_ring(self, cache_k, cache_v, q, k, v, scale):
        """A sliding layer once some sequence of the pass goes past its ring (R = window positions)."""
        device, R, T = cache_k.device, cache_k.shape[2], self.new_tokens
        p = self._placement(device)
        rows = p.contiguous if p.contiguous is not None else p.slots  # a view when the slots are in order
        if T == 1:
            # Write first: the ring then holds exactly the query's window, q - R + 1 .. q.
            self._write_step(cache_k, cache_v, k, v, ring=True)
            return _sdpa(q, cache_k[rows], cache_v[rows], self._ring_mask(device, R), scale)
        # A prompt chunk: its early queries still need ring entries its later keys would
        # overwrite, so attend over the ring's entries and the new keys side by side, by position.
        keys = torch.cat([cache_k[rows], k.to(cache_k.dtype)], dim=2)
        values = torch.cat([cache_v[rows], v.to(cache_v.dtype)], dim=2)
        out = _sdpa(q, keys, values, self._ring_mask(device, R), scale)
        kept = min(T, R)  # the chunk's last keys are the ring's newest
        for i, (slot, start) in enumerate(zip(self.slot_list, self.start_list)):
            where = torch.arange(start + T - kept, start + T, device=device) % R
            cache_k[slot, :, where] = k[i, :, T - kept:].to(cache_k.dtype)
            cache_v[slot, :, where] = v[i, :, T - kept:].to(cache_v.dtype)
        return out

    def commit(self) -> None:
        """Records the pass's tokens as cached (call after the forward pass succeeded)."""
        for slot, start in zip(self.slot_list, self.start_list):
            self.cache.lengths[slot] = start + self.new_tokens
