"""GGUF files (llama.cpp's single-file checkpoints): header, metadata and tensor table read
with every size checked against the file's length, tensors dequantized by the `gguf` package.

The layout (little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):

    u32 magic "GGUF", u32 version (2 or 3), u64 tensor count, u64 metadata count,
    metadata: string key, u32 value type, value (arrays: u32 element type, u64 count, elements)
    tensor infos: string name, u32 n_dims, u64 dims[n_dims] (innermost first), u32 ggml type,
                  u64 offset into the data section
    padding to general.alignment (default 32), then the data section.

A string is a u64 byte count and the UTF-8 bytes. The file is untrusted: a count or a length
that could not fit in the bytes left is refused before anything is allocated for it, and each
tensor's byte range must lie inside the data section. The tensors stay in a read-only memory
map until a family asks for them.
"""
from __future__ import annotations

import functools
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ModelLoadFailed

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_KEY_BYTES = 65535  # the GGUF spec caps keys at 2^16 - 1 bytes

# value type -> (struct code, size); 8 (string) and 9 (array) are read apart
_SCALARS = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4), 6: ("f", 4),
            7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8)}
_STRING, _ARRAY = 8, 9
# The smallest a metadata entry (empty key, u32 type, one byte) and a tensor info (empty name,
# u32 n_dims, u32 type, u64 offset) can be: bounds the counts a header may claim.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8


def corrupt(path: Path, what: str) -> ModelLoadFailed:
    return ModelLoadFailed(f"{path.name} is not a valid GGUF file: {what}", reason="GGUF_CORRUPT")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (outermost first): GGUF's dims reversed
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass
class GGUFFile:
    """A parsed GGUF header: metadata values (Python scalars, strings and lists) and the tensor
    table. `read(name)` dequantizes one tensor to a float32 torch tensor, when asked for."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        value = self.metadata.get("general.architecture")
        if not isinstance(value, str):
            raise corrupt(self.path, "general.architecture is missing")
        return value

    def stores_quantized_blocks(self) -> bool:
        """Its blocks' matrices are stored in a quantized type (Q4_K, Q8_0, ...), not F32 / F16 /
        BF16: the file's own grids are there to keep (layers/grid_detect.py)."""
        floats = {0, 1, 30}  # GGMLQuantizationType F32, F16, BF16
        return any(info.name.startswith("blk.") and len(info.shape) == 2 and info.ggml_type not in floats
                   for info in self.tensors.values())

    def read(self, name: str) -> torch.Tensor:
        """One tensor dequantized to float32, straight into its own storage: the rows are
        dequantized a slice at a time, so reading a tensor costs its float32 size plus one
        slice, never a second full-size copy."""
        info = self.tensors[name]
        with open(self.path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
            raw = np.frombuffer(view, dtype=np.uint8, count=info.nbytes, offset=info.offset)
            try:
                return _dequantize_into(raw, info)
            finally:
                del raw  # no view into the map may outlive it

    def read_all(self):
        """(name, float32 tensor) for every tensor, in file order, each read when asked for."""
        for name in self.tensors:
            yield name, self.read(name)


# Rows dequantized per slice: bounds the gguf package's temporaries (a few float32 copies of
# the slice) to a few MiB whatever the tensor's size.
_SLICE_ELEMENTS = 1 << 20


def _dequantize_into(raw: np.ndarray, info: TensorInfo) -> torch.Tensor:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(info.ggml_type)
    row_count = _row_count(info.shape)
    rows = raw.reshape(row_count, info.nbytes // max(1, row_count))
    out = torch.empty(info.shape, dtype=torch.float32)
    flat = out.view(row_count, -1).numpy()
    step = max(1, _SLICE_ELEMENTS // max(1, flat.shape[1]))
    try:
        for start in range(0, row_count, step):
            # an assignment copies: F32 data would otherwise be a view into the memory map
            flat[start:start + step] = dequantize(rows[start:start + step], qtype)
    except NotImplementedError:
        raise ModelLoadFailed(f"tensor {info.name}: the gguf package cannot dequantize {qtype.name}",
                              reason="GGUF_UNSUPPORTED_TYPE") from None
    return out


def _row_count(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape[:-1]:
        count *= dim
    return count


class _Cursor:
    """Reads the header from a memory map; every read is checked against the end of the file."""

    def __init__(self, path: Path, view: mmap.mmap):
        self.path, self.view, self.pos, self.end = path, view, 0, len(view)

    def take(self, count: int, what: str) -> bytes:
        if count < 0 or count > self.end - self.pos:
            raise corrupt(self.path, f"{what} at byte {self.pos} needs {count} bytes; the file ends at {self.end}")
        data = self.view[self.pos:self.pos + count]
        self.pos += count
        return data

    def scalar(self, code: str, size: int, what: str):
        return struct.unpack("<" + code, self.take(size, what))[0]

    def u32(self, what: str) -> int:
        return self.scalar("I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("Q", 8, what)

    def string(self, what: str) -> str:
        length = self.u64(what)
        data = self.take(length, what)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise corrupt(self.path, f"{what} is not UTF-8") from None

    def value(self, value_type: int, what: str) -> Any:
        if value_type in _SCALARS:
            return self.scalar(*_SCALARS[value_type], what)
        if value_type == _STRING:
            return self.string(what)
        if value_type == _ARRAY:
            item_type, count = self.u32(what), self.u64(what)
            if item_type in _SCALARS:
                code, size = _SCALARS[item_type]
                if count > (self.end - self.pos) // size:
                    raise corrupt(self.path, f"{what}: {count} elements cannot fit in the file")
                return list(struct.unpack(f"<{count}{code}", self.take(count * size, what)))
            if item_type == _STRING:
                # each string is at least its 8-byte length
                if count > (self.end - self.pos) // 8:
                    raise corrupt(self.path, f"{what}: {count} strings cannot fit in the file")
                return [self.string(what) for _ in range(count)]
            raise corrupt(self.path, f"{what}: arrays of value type {item_type} are not allowed")
        raise corrupt(self.path, f"{what}: unknown value type {value_type}")


def read_header(path: Path) -> GGUFFile:
    """The metadata and tensor table of `path`, validated; no tensor data is read."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise ModelLoadFailed(f"cannot open {path.name}: {exc.strerror}", reason="WEIGHTS_MISSING") from None
    with handle:
        size = handle.seek(0, 2)
        if size < 24:
            raise corrupt(path, f"{size} bytes is shorter than a GGUF header")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
            cur = _Cursor(path, view)
            if cur.take(4, "magic") != GGUF_MAGIC:
                raise corrupt(path, "the magic bytes are not 'GGUF'")
            version = cur.u32("version")
            if version not in SUPPORTED_VERSIONS:
                raise corrupt(path, f"version {version} is not one of {SUPPORTED_VERSIONS}")
            tensor_count, kv_count = cur.u64("tensor count"), cur.u64("metadata count")
            if kv_count > size // _MIN_KV_BYTES or tensor_count > size // _MIN_TENSOR_INFO_BYTES:
                raise corrupt(path, f"{kv_count} metadata entries and {tensor_count} tensors cannot fit in {size} bytes")
            metadata: dict[str, Any] = {}
            for _ in range(kv_count):
                key = cur.string("metadata key")
                if not key or len(key) > MAX_KEY_BYTES or key in metadata:
                    raise corrupt(path, f"metadata key {key[:80]!r} is empty, too long or repeated")
                metadata[key] = cur.value(cur.u32(f"type of {key[:80]}"), key[:80])
            infos = []
            for _ in range(tensor_count):
                name = cur.string("tensor name")
                n_dims = cur.u32(f"{name[:80]} n_dims")
                if not 1 <= n_dims <= MAX_DIMS:
                    raise corrupt(path, f"tensor {name[:80]} has {n_dims} dimensions")
                dims = [cur.u64(f"{name[:80]} dims") for _ in range(n_dims)]
                ggml_type, offset = cur.u32(f"{name[:80]} type"), cur.u64(f"{name[:80]} offset")
                infos.append((name, dims, ggml_type, offset))
            alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
            if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
                raise corrupt(path, f"general.alignment {alignment!r} is not a power of two")
            data_start = -(-cur.pos // alignment) * alignment

    tensors: dict[str, TensorInfo] = {}
    for name, dims, ggml_type, offset in infos:
        if name in tensors:
            raise corrupt(path, f"tensor {name[:80]} appears twice")
        try:
            qtype = GGMLQuantizationType(ggml_type)
        except ValueError:
            raise ModelLoadFailed(f"tensor {name[:80]} has ggml type {ggml_type}, which this server does not know",
                                  reason="GGUF_UNSUPPORTED_TYPE") from None
        block, type_bytes = GGML_QUANT_SIZES[qtype]
        if dims[0] % block:
            raise corrupt(path, f"tensor {name[:80]}: a row of {dims[0]} is not whole {qtype.name} blocks of {block}")
        elements = 1
        for dim in dims:
            elements *= dim  # Python ints: a lying dimension cannot overflow
        nbytes = elements // block * type_bytes
        start = data_start + offset
        if offset % alignment or start + nbytes > size:
            raise corrupt(path, f"tensor {name[:80]} ({nbytes} bytes at {start}) lies outside the {size}-byte file")
        tensors[name] = TensorInfo(name, tuple(reversed(dims)), ggml_type, start, nbytes)
    return GGUFFile(path, version, metadata, tensors)


@functools.lru_cache(maxsize=2)
def _cached_header(path: Path, mtime_ns: int, size: int) -> GGUFFile:
    return read_header(path)


def open_gguf(path: Path) -> GGUFFile:
    """read_header, parsed once per file version: resolving a model, reading its tensors and
    building its tokenizer all read the same header (a 262k-token vocabulary is 0.5 s)."""
    stat = path.stat()
    return _cached_header(path, stat.st_mtime_ns, stat.st_size)


def find_gguf(directory: Path) -> Path | None:
    """The one .gguf file in `directory`, None when there is none; two are ambiguous."""
    found = sorted(p for p in directory.glob("*.gguf") if p.is_file())
    if len(found) > 1:
        raise ModelLoadFailed(f"{directory} holds {len(found)} .gguf files ({', '.join(p.name for p in found[:4])}); "
                              "name the file to load", reason="BAD_CONFIG")
    return found[0] if found else None
