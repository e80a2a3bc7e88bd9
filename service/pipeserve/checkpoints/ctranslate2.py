"""CTranslate2 (faster-whisper) Whisper checkpoints -> the sizes and state dict (in transformers'
names) our Whisper module loads.

model.bin layout (format version 6, little-endian; CTranslate2 python/ctranslate2/specs/
model_spec.py `ModelSpec._serialize`): u32 version; string spec name; u32 spec revision;
u32 variable count; per variable: string name, u8 rank, u32 dims[rank], u8 dtype, u32 byte
count, raw bytes; then u32 alias count and (alias, target) string pairs. A string is a u16
length that counts a trailing NUL, then the bytes. The names and fused layouts come from
CTranslate2's converters/transformers.py `WhisperLoader` (the reverse of this mapping):
self-attention `linear_0` stacks q, k, v rows; cross-attention `linear_1` stacks k, v; the k
bias does not exist in Whisper (stored as zeros in the fused bias).
"""
from __future__ import annotations

import math
import mmap
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelLoadFailed

# Rows converted at a time into a column-major layout (see _load_variable).
_TRANSPOSE_BLOCK_ROWS = 256
# dtype code -> torch dtype (CTranslate2 DataType enum order).
_DTYPES = {0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.float16, 5: torch.bfloat16}


@dataclass(frozen=True)
class WhisperSizes:
    """The network's sizes read off the tensor shapes (a CTranslate2 directory has no HF
    config.json), in transformers' WhisperConfig field names; models/whisper.py builds its
    config from them, so this reader does not import the family."""

    vocab_size: int
    num_mel_bins: int
    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_layers: int
    decoder_attention_heads: int
    decoder_ffn_dim: int
    max_source_positions: int
    max_target_positions: int


class _Reader:
    def __init__(self, data: memoryview):
        self.data, self.pos = data, 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise ModelLoadFailed("CTranslate2 model.bin is truncated", reason="BAD_WEIGHTS")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("<H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def string(self) -> str:
        return bytes(self.take(self.u16())).rstrip(b"\0").decode("utf-8")


def map_file(path: Path) -> memoryview:
    """The file's bytes mapped copy-on-write, not read: pages come from the page cache when a
    tensor touches them (shared with every process mapping the same file), and a tensor that
    keeps the file's dtype holds no private copy at all. Copy-on-write (not read-only) so that
    torch may view the bytes as a writable tensor; nothing writes to the weights."""
    with open(path, "rb") as handle:
        if handle.seek(0, 2) == 0:
            return memoryview(b"")
        return memoryview(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY))


def _drop_pages(raw: memoryview, start: int, end: int) -> None:
    """The mapping's pages wholly inside bytes [start, end) leave this process's resident set
    (they stay in the page cache, and come back from it if touched again): a variable that was
    copied or converted is read once, and its file pages would otherwise count as resident as
    long as any view keeps the mapping (measured: 56 MiB of tiny.en's unaligned variables, or
    the whole file during a float32 load's conversion). Nothing was written to them, so
    dropping them loses nothing."""
    mapping = raw.obj
    if not isinstance(mapping, mmap.mmap) or not hasattr(mapping, "madvise"):
        return
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        mapping.madvise(mmap.MADV_DONTNEED, first, last - first)


# A variable that is copied (converted, or not element-aligned in the file) is copied this many
# bytes of the file at a time, so the load's transient is one block rather than the variable
# (Whisper's head: 38 MiB of float16, which an unaligned whole-variable copy held twice over on
# top of its file pages: +76 MiB at the load's peak).
COPY_BLOCK_BYTES = 1 << 20


def _load_variable(raw: memoryview, offset: int, dims: list[int], dtype: torch.dtype,
                   convert_to: torch.dtype | None, column_major: bool) -> torch.Tensor:
    """One variable at raw[offset:]: a view of the mapping where it keeps the file's dtype and
    is element-aligned; otherwise a copy (converted to `convert_to` for floating variables,
    column-major when asked: [out, in] stored as the transpose of a contiguous [in, out]),
    filled a block of rows at a time, each block's file pages dropped once copied."""
    count = math.prod(dims)
    nbytes = dtype.itemsize * count
    if nbytes == 0:
        return torch.empty(dims, dtype=dtype)
    aligned = offset % dtype.itemsize == 0
    convert = convert_to is not None and dtype.is_floating_point and convert_to != dtype
    if not convert and aligned:
        return _frombuffer(raw, dtype, count, offset).reshape(dims)
    target = convert_to if convert else dtype
    out = (torch.empty(dims[::-1], dtype=target).t() if column_major and len(dims) == 2
           else torch.empty(dims, dtype=target))
    rows = dims[0] if dims else 1
    row_shape, row_count = dims[1:], count // rows
    step = max(1, COPY_BLOCK_BYTES // (row_count * dtype.itemsize))
    if column_major and len(dims) == 2:
        # Row blocks into a column-major matrix land as short contiguous runs in every column,
        # which the caches keep while the block lasts: one strided copy of Whisper tiny's head
        # (51864 x 384, float16 -> float32) took 0.17 CPU s, blocks of 256 rows 0.06 s.
        step = min(step, _TRANSPOSE_BLOCK_ROWS)
    for first in range(0, rows, step):
        last = min(rows, first + step)
        start, end = offset + first * row_count * dtype.itemsize, offset + last * row_count * dtype.itemsize
        # An unaligned block goes through an aligned private copy of its bytes (kernels may
        # assume element alignment; CTranslate2 does not align variables).
        block = (_frombuffer(raw, dtype, (last - first) * row_count, start) if aligned
                 else torch.frombuffer(bytearray(raw[start:end]), dtype=dtype))
        if dims:
            out[first:last].copy_(block.view(last - first, *row_shape))
        else:
            out.copy_(block.view(dims))
        _drop_pages(raw, start, end)
    _drop_pages(raw, offset, offset + nbytes)  # the pages blocks shared at their edges
    return out


def _frombuffer(raw: memoryview, dtype: torch.dtype, count: int, offset: int) -> torch.Tensor:
    with warnings.catch_warnings():  # "non-writable buffer": ACCESS_COPY is writable; older torch warns anyway
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(raw, dtype=dtype, count=count, offset=offset)


def read_variables(path: Path, convert_to: torch.dtype | None = None,
                   column_major: frozenset[str] = frozenset()) -> tuple[str, dict[str, torch.Tensor]]:
    """All named tensors of a CTranslate2 model.bin (aliases resolved), and its spec name.
    Tensors in the file's dtype are views of the mapped file (map_file): reading copies
    nothing. With `convert_to`, floating variables of another dtype are converted one at a
    time as they are read, each variable's file pages dropped once converted, so a load holds
    the converted model and one variable, not the file as well; names in `column_major` are
    converted into that layout (Whisper's tied head: layers/head_layout.py)."""
    raw = map_file(path)
    r = _Reader(raw)
    version = r.u32()
    if version < 5 or version > 6:
        raise ModelLoadFailed(f"{path}: CTranslate2 format version {version} is not supported (5-6)",
                              reason="BAD_WEIGHTS")
    spec = r.string()
    r.u32()  # spec revision
    tensors: dict[str, torch.Tensor] = {}
    for _ in range(r.u32()):
        name = r.string()
        dims = [r.u32() for _ in range(r.u8())]
        code = r.u8()
        nbytes = r.u32()
        if code not in _DTYPES:
            raise ModelLoadFailed(f"{path}: variable {name} has unknown dtype code {code}", reason="BAD_WEIGHTS")
        dtype = _DTYPES[code]
        expected = dtype.itemsize
        for d in dims:
            expected *= d
        if nbytes != expected:
            raise ModelLoadFailed(f"{path}: variable {name} holds {nbytes} bytes, its shape {dims} needs {expected}",
                                  reason="BAD_WEIGHTS")
        r.take(nbytes)
        # An unaligned variable is copied: CTranslate2 does not align them, and kernels may
        # assume element alignment.
        tensors[name] = _load_variable(raw, r.pos - nbytes, dims, dtype, convert_to, name in column_major)
    if r.pos < len(raw):
        for _ in range(r.u32()):
            alias, target = r.string(), r.string()
            if target in tensors:
                tensors[alias] = tensors[target]
    return spec, tensors


def _dequantize(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """int8 weights carry a per-row `<name>_scale`: w = q / scale (CTranslate2's quantization)."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("_scale"):
            continue
        scale = tensors.get(name + "_scale")
        if t.dtype == torch.int8 and scale is not None:
            t = t.float() / scale.float().reshape(-1, *([1] * (t.dim() - 1)))
        out[name] = t
    return out


def _int(t: torch.Tensor) -> int:
    return int(t.reshape(-1)[0].item())


def read_whisper(path: Path, dtype: torch.dtype = torch.float32) -> tuple[WhisperSizes, dict[str, torch.Tensor]]:
    """model.bin -> (sizes inferred from shapes, state dict in transformers' names, floating
    tensors in `dtype`). Tensors already in `dtype` stay views of the mapped file (the split
    fused projections too: rows of a row-major matrix), so only a dtype change copies."""
    # The tied head is read column-major when converted: the layout Whisper keeps it in
    # (layers/packed_linear.pack_linears share_tied), which would otherwise cost a second copy.
    spec, v = read_variables(path, dtype, frozenset({"decoder/embeddings/weight"}))
    if spec != "WhisperSpec":
        raise ModelLoadFailed(f"{path} holds a CTranslate2 {spec!r}, not a WhisperSpec", reason="UNSUPPORTED_FAMILY")
    v = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in _dequantize(v).items()}  # int8 files
    layer_ids = lambda side: sorted({int(m.group(1)) for k in v if (m := re.match(rf"{side}/layer_(\d+)/", k))})
    enc_layers, dec_layers = layer_ids("encoder"), layer_ids("decoder")
    d_model = v["encoder/conv1/weight"].shape[0]
    config = WhisperSizes(
        vocab_size=v["decoder/embeddings/weight"].shape[0],
        num_mel_bins=v["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=len(enc_layers),
        encoder_attention_heads=_int(v["encoder/num_heads"]) if "encoder/num_heads" in v else d_model // 64,
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_layers=len(dec_layers),
        decoder_attention_heads=_int(v["decoder/num_heads"]) if "decoder/num_heads" in v else d_model // 64,
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
    )
    s: dict[str, torch.Tensor] = {}

    def linear(dst: str, src: str) -> None:
        s[f"{dst}.weight"] = v[f"{src}/weight"]
        if f"{src}/bias" in v:
            s[f"{dst}.bias"] = v[f"{src}/bias"]

    def norm(dst: str, src: str) -> None:
        s[f"{dst}.weight"], s[f"{dst}.bias"] = v[f"{src}/gamma"], v[f"{src}/beta"]

    def ffn(dst: str, src: str) -> None:
        norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
        linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
        linear(f"{dst}.fc2", f"{src}/ffn/linear_1")

    def split_rows(dst: str, names: list[str], weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        for name, w in zip(names, weight.chunk(len(names), 0)):
            s[f"{dst}.{name}.weight"] = w.contiguous()
        if bias is not None:
            for name, b in zip(names, bias.chunk(len(names), 0)):
                if name != "k_proj":  # Whisper's key projection has no bias
                    s[f"{dst}.{name}.bias"] = b.contiguous()

    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    s["model.encoder.embed_positions.weight"] = v["encoder/position_encodings/encodings"]
    norm("model.encoder.layer_norm", "encoder/layer_norm")
    for i in enc_layers:
        dst, src = f"model.encoder.layers.{i}", f"encoder/layer_{i}"
        att = f"{src}/self_attention"
        split_rows(f"{dst}.self_attn", ["q_proj", "k_proj", "v_proj"], v[f"{att}/linear_0/weight"], v.get(f"{att}/linear_0/bias"))
        linear(f"{dst}.self_attn.out_proj", f"{att}/linear_1")
        norm(f"{dst}.self_attn_layer_norm", f"{att}/layer_norm")
        ffn(dst, src)
    s["model.decoder.embed_tokens.weight"] = v["decoder/embeddings/weight"]
    s["model.decoder.embed_positions.weight"] = v["decoder/position_encodings/encodings"]
    norm("model.decoder.layer_norm", "decoder/layer_norm")
    for i in dec_layers:
        dst, src = f"model.decoder.layers.{i}", f"decoder/layer_{i}"
        att, cross = f"{src}/self_attention", f"{src}/attention"
        split_rows(f"{dst}.self_attn", ["q_proj", "k_proj", "v_proj"], v[f"{att}/linear_0/weight"], v.get(f"{att}/linear_0/bias"))
        linear(f"{dst}.self_attn.out_proj", f"{att}/linear_1")
        norm(f"{dst}.self_attn_layer_norm", f"{att}/layer_norm")
        linear(f"{dst}.encoder_attn.q_proj", f"{cross}/linear_0")
        split_rows(f"{dst}.encoder_attn", ["k_proj", "v_proj"], v[f"{cross}/linear_1/weight"], v.get(f"{cross}/linear_1/bias"))
        linear(f"{dst}.encoder_attn.out_proj", f"{cross}/linear_2")
        norm(f"{dst}.encoder_attn_layer_norm", f"{cross}/layer_norm")
        ffn(dst, src)
    return config, s
