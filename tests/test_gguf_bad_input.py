"""Bad GGUF files: truncated, corrupted, lying about sizes, in an unknown block type, of an
architecture we do not serve, or with metadata that disagrees with the tensors. Each is refused
at load with its own ModelLoadFailed reason, before anything the header claims is allocated, and
a server asked to load one keeps serving."""
from __future__ import annotations

import struct
import time
import tracemalloc

import grpc
import pytest

from gguf_checkpoints import build_llama_gguf
from harness import load_pipeline

from pipeserve.errors import ModelLoadFailed

HUGE = 1 << 60


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path, _ = build_llama_gguf(tmp_path_factory.mktemp("gguf-bad"), "Q8_0")
    return path.read_bytes()


def _write(tmp_path, data: bytes, name: str = "model.gguf"):
    directory = tmp_path / "model"
    directory.mkdir(exist_ok=True)
    (directory / name).write_bytes(data)
    return directory


def _refused(tmp_path, data: bytes) -> ModelLoadFailed:
    directory = _write(tmp_path, data)
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(ModelLoadFailed) as caught:
            load_pipeline(directory).close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # nothing the header claims was allocated or looped over: the tiny file is ~40 kB
    assert peak < 32 << 20, f"peak {peak >> 20} MiB allocated while refusing a {len(data)}-byte file"
    assert time.monotonic() - started < 30
    return caught.value


def _value_offset(data: bytes, key: str) -> int:
    """Where the value of metadata `key` starts (after the key and its u32 value type)."""
    encoded = key.encode()
    at = data.index(struct.pack("<Q", len(encoded)) + encoded)
    return at + 8 + len(encoded) + 4


def _tensor_info_offset(data: bytes, name: str) -> int:
    """Where tensor `name`'s info continues after its name (at its u32 n_dims)."""
    encoded = name.encode()
    at = data.index(struct.pack("<Q", len(encoded)) + encoded)
    return at + 8 + len(encoded)


def _patch(data: bytes, offset: int, packed: bytes) -> bytes:
    return data[:offset] + packed + data[offset + len(packed):]


def test_the_unpatched_file_loads(tmp_path, good):
    load_pipeline(_write(tmp_path, good)).close()


@pytest.mark.parametrize("keep", [3, 23, 100, 2000])
def test_truncated_in_the_header(tmp_path, good, keep):
    assert _refused(tmp_path, good[:keep]).reason == "GGUF_CORRUPT"


def test_truncated_in_the_tensor_data(tmp_path, good):
    error = _refused(tmp_path, good[:-64])
    assert error.reason == "GGUF_CORRUPT" and "outside" in str(error)


def test_not_a_gguf_file(tmp_path, good):
    assert _refused(tmp_path, b"GGML" + good[4:]).reason == "GGUF_CORRUPT"
    assert _refused(tmp_path, _patch(good, 4, struct.pack("<I", 99))).reason == "GGUF_CORRUPT"  # version


@pytest.mark.parametrize("offset", [8, 16], ids=["tensor-count", "metadata-count"])
def test_a_lying_count(tmp_path, good, offset):
    assert _refused(tmp_path, _patch(good, offset, struct.pack("<Q", HUGE))).reason == "GGUF_CORRUPT"


def test_a_lying_string_length(tmp_path, good):
    assert _refused(tmp_path, _patch(good, 24, struct.pack("<Q", HUGE))).reason == "GGUF_CORRUPT"


def test_a_lying_array_length(tmp_path, good):
    at = _value_offset(good, "tokenizer.ggml.tokens") + 4  # after the element type
    assert _refused(tmp_path, _patch(good, at, struct.pack("<Q", HUGE))).reason == "GGUF_CORRUPT"
    at = _value_offset(good, "tokenizer.ggml.scores") + 4
    assert _refused(tmp_path, _patch(good, at, struct.pack("<Q", 1 << 40))).reason == "GGUF_CORRUPT"


def test_a_lying_tensor_dimension(tmp_path, good):
    at = _tensor_info_offset(good, "token_embd.weight") + 4 + 8  # n_dims, then dims[0]; patch dims[1]
    error = _refused(tmp_path, _patch(good, at, struct.pack("<Q", 1 << 40)))
    assert error.reason == "GGUF_CORRUPT" and "token_embd.weight" in str(error)


def test_too_many_dimensions(tmp_path, good):
    at = _tensor_info_offset(good, "token_embd.weight")
    assert _refused(tmp_path, _patch(good, at, struct.pack("<I", 1000))).reason == "GGUF_CORRUPT"


def test_a_tensor_offset_past_the_end(tmp_path, good):
    at = _tensor_info_offset(good, "output_norm.weight") + 4 + 8 + 4  # 1-D: n_dims, dims[0], type
    assert _refused(tmp_path, _patch(good, at, struct.pack("<Q", 1 << 40))).reason == "GGUF_CORRUPT"


def test_an_unknown_quantization_type(tmp_path, good):
    at = _tensor_info_offset(good, "blk.0.attn_q.weight") + 4 + 2 * 8
    error = _refused(tmp_path, _patch(good, at, struct.pack("<I", 200)))
    assert error.reason == "GGUF_UNSUPPORTED_TYPE" and "blk.0.attn_q.weight" in str(error)


def test_an_architecture_we_do_not_serve(tmp_path, good):
    at = _value_offset(good, "general.architecture") + 8  # after the string's length
    assert good[at:at + 5] == b"llama"
    error = _refused(tmp_path, _patch(good, at, b"mamba"))
    assert error.reason == "UNSUPPORTED_FAMILY" and "mamba" in str(error)


@pytest.mark.parametrize("key, value", [
    ("llama.block_count", 3),  # more blocks than the tensors hold
    ("llama.block_count", 1),  # fewer
    ("llama.embedding_length", 64),
    ("llama.feed_forward_length", 32),
    ("llama.attention.head_count_kv", 3),  # does not divide 4 heads
    ("llama.attention.head_count", 2),  # q rows are 4 heads of 8
    ("llama.vocab_size", 7),
    ("llama.context_length", 0),
])
def test_metadata_that_disagrees_with_the_tensors(tmp_path, good, key, value):
    error = _refused(tmp_path, _patch(good, _value_offset(good, key), struct.pack("<I", value)))
    assert error.reason == "GGUF_METADATA_MISMATCH", str(error)


def test_missing_metadata(tmp_path, good):
    key = b"llama.feed_forward_length"
    error = _refused(tmp_path, good.replace(key, b"llama.feed_forward_lengtX"))
    assert error.reason == "GGUF_METADATA_MISMATCH" and "feed_forward_length" in str(error)


def test_a_tensor_the_architecture_does_not_have(tmp_path, good):
    error = _refused(tmp_path, good.replace(b"blk.0.ffn_gate.weight", b"blk.0.ffn_xate.weight"))
    assert error.reason == "WEIGHTS_MISMATCH" and "ffn_xate" in str(error)


def test_two_gguf_files_in_one_directory_are_ambiguous(tmp_path, good):
    directory = _write(tmp_path, good)
    (directory / "other.gguf").write_bytes(good)
    with pytest.raises(ModelLoadFailed) as caught:
        load_pipeline(directory)
    assert caught.value.reason == "BAD_CONFIG"
    load_pipeline(directory / "other.gguf").close()  # naming the file settles it


def test_loadmodel_refuses_a_corrupt_file_and_keeps_serving(grpc_server, tmp_path, good):
    from grpc_testing import error_reason, load_model

    bad = _write(tmp_path, good[:-64], "bad.gguf") / "bad.gguf"
    with pytest.raises(grpc.RpcError) as caught:
        load_model(grpc_server, bad)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(caught.value) == "GGUF_CORRUPT"
    fine = tmp_path / "fine"
    fine.mkdir()
    (fine / "fine.gguf").write_bytes(good)
    assert load_model(grpc_server, fine).family == "llama"
