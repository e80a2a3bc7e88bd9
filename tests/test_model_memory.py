"""Issue #16 item 3: every resident byte of a model accounted by kind, in GetModel and /metrics,
adding up to what the manager's budget counts; the copies that did not pay are gone (Whisper's
tied head keeps one float32 form, shared with the embedding, and no screening copy); CTranslate2
weights are mapped from the file, not copied, where the dtype allows, and converted one variable
at a time, the head straight into its column-major layout; building a module imports nothing
heavy; freed activations leave the resident set.""" 
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import whisper_checkpoints as wc
from grpc_testing import load_model, make_server
from test_metrics import scrape



@pytest.fixture(scope="module")
def server():
    handle = make_server(metrics_listen="127.0.0.1:0")
    yield handle
    handle.stop()


def test_get_model_and_metrics_break_down_the_budgeted_bytes(server):
    from pipeserve.v1 import model_pb2, model_pb2_grpc

    info = load_model(server, "embedded/whisper-tiny.en")
    memory = info.memory
    kinds = [memory.weights_bytes, memory.packed_bytes, memory.screening_bytes, memory.cache_bytes]
    assert sum(kinds) == info.bytes > 0
    entry = server.manager.find(info.name)
    assert entry.bytes == info.bytes  # what the budget counts

    # The tied head is stored once: the float32 weights are Whisper tiny.en's 37.8M parameters
    # (no second 76 MiB float32 head), and no screening copy (models/whisper.py "exact_head").
    pipeline = entry.pipeline
    decoder = pipeline.model.decoder
    vocab, width = decoder.embed_tokens.weight.shape
    assert decoder.proj_out.weight is decoder.embed_tokens.weight
    assert decoder.proj_out.weight.t().is_contiguous()  # column-major, shared with the embedding
    from pipeserve.checkpoints.ctranslate2 import read_whisper

    _, state = read_whisper(wc.embedded_dir() / "model.bin")
    checkpoint_bytes = 4 * sum(t.numel() for t in state.values() if t.is_floating_point())
    del state
    # Every float32 weight once (packed ones instead of their dense form), plus computed
    # buffers (encoder positions): no second head, no dense copy beside a packed one.
    assert checkpoint_bytes <= memory.weights_bytes + memory.packed_bytes <= checkpoint_bytes + (4 << 20)
    assert 4 * vocab * width <= memory.weights_bytes < 2 * 4 * vocab * width
    assert memory.screening_bytes == 0 and pipeline.model.decoder.verified_head is None

    again = model_pb2_grpc.ModelServiceStub(server.channel).GetModel(
        model_pb2.GetModelRequest(model=info.name), timeout=30)
    assert again.model.memory == memory

    samples = scrape(server)
    by_kind = {labels["kind"]: v for labels, v in samples["pipeserve_model_memory_bytes"]
               if labels["model"] == info.name}
    assert by_kind == {"weights": memory.weights_bytes, "packed": memory.packed_bytes,
                       "screening": memory.screening_bytes, "cache": memory.cache_bytes}
    resident = [v for labels, v in samples["pipeserve_model_resident_bytes"] if labels["model"] == info.name]
    assert resident == [sum(by_kind.values())]
    # The allocator's side, process-wide (runtime/heap.heap_usage): in use covers the models.
    heap = {labels["state"]: v for labels, v in samples.get("pipeserve_heap_bytes", [])}
    from pipeserve.runtime.heap import heap_usage

    if heap_usage() is not None:
        assert set(heap) == {"in_use", "free"} and heap["in_use"] > 0 and heap["free"] >= 0


def test_the_memory_kinds_count_shared_storage_once():
    from torch import nn
    from pipeserve.layers.memory import module_memory
    from pipeserve.layers.packed_linear import pack_linears, supported

    embedding = nn.Embedding(64, 16)
    head = nn.Linear(16, 64, bias=False)
    head.weight = embedding.weight
    model = nn.ModuleDict({"embed": embedding, "head": head, "mlp": nn.Linear(16, 16)})
    assert module_memory([model]) == {"weights": 64 * 16 * 4 + 16 * 16 * 4 + 16 * 4, "packed": 0,
                                      "screening": 0, "cache": 0}
    if not supported(model["mlp"].weight):
        pytest.skip("no oneDNN packed linear on this build")
    pack_linears(model, share_tied=True)
    assert type(model["head"]) is nn.Linear and model["head"].weight is model["embed"].weight
    assert model["head"].weight.t().is_contiguous()
    usage = module_memory([model])
    assert usage["weights"] == 64 * 16 * 4 + 16 * 4  # the shared head once, the mlp's bias
    assert usage["packed"] == 16 * 16 * 4  # the mlp's packed weight replaced its dense one
    x = torch.randn(3, 16)
    torch.testing.assert_close(model["head"](x), x @ model["embed"].weight.t())


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.rstrip().endswith(str(path)):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_ctranslate2_tensors_in_the_files_dtype_are_views_of_the_mapped_file():
    from pipeserve.checkpoints.ctranslate2 import read_whisper

    path = (wc.embedded_dir() / "model.bin").resolve()
    config, state = read_whisper(path, torch.float16)  # the file's dtype: nothing to convert
    ranges = _mapped_ranges(path)
    assert ranges, "model.bin is not mapped"
    inside = lambda t: any(start <= t.data_ptr() < end for start, end in ranges)
    assert all(t.dtype == torch.float16 for t in state.values() if t.is_floating_point())
    # A tensor at an odd byte offset is copied (CTranslate2 does not align its variables, and
    # kernels may assume element alignment); every aligned one is a view of the mapping.
    views = [t for t in state.values() if t.is_floating_point() and inside(t)]
    copies = [t for t in state.values() if t.is_floating_point() and not inside(t)]
    assert views, "no tensor is a view of the mapped file"
    print(f"mapped {sum(t.numel() for t in views) * 2 >> 20} MiB, copied {sum(t.numel() for t in copies) * 2 >> 20} MiB")

    config32, state32 = read_whisper(path, torch.float32)  # a dtype change is the one copy
    emb = state32["model.decoder.embed_tokens.weight"]
    assert emb.dtype == torch.float32 and not inside(emb)
    assert emb.t().is_contiguous()  # converted straight into the tied head's column-major layout
    torch.testing.assert_close(emb, state["model.decoder.embed_tokens.weight"].float(), rtol=0, atol=0)


def test_a_truncated_or_inconsistent_ctranslate2_file_is_refused(tmp_path):
    from pipeserve.checkpoints.ctranslate2 import read_variables
    from pipeserve.errors import ModelLoadFailed
    import struct

    def variable(name: bytes, dims: list[int], code: int, payload: bytes) -> bytes:
        return (struct.pack("<H", len(name) + 1) + name + b"\0" + struct.pack("<B", len(dims))
                + struct.pack(f"<{len(dims)}I", *dims) + struct.pack("<BI", code, len(payload)) + payload)

    header = struct.pack("<I", 6) + struct.pack("<H", 12) + b"WhisperSpec\0" + struct.pack("<I", 1)
    good = header + struct.pack("<I", 1) + variable(b"w", [2, 3], 0, bytes(24)) + struct.pack("<I", 0)
    (tmp_path / "good.bin").write_bytes(good)
    spec, tensors = read_variables(tmp_path / "good.bin")
    assert spec == "WhisperSpec" and tensors["w"].shape == (2, 3)

    # A byte count that disagrees with the shape (before any allocation) and a truncated file.
    (tmp_path / "mismatch.bin").write_bytes(header + struct.pack("<I", 1) + variable(b"w", [1000, 1000], 0, bytes(24)))
    with pytest.raises(ModelLoadFailed, match="shape"):
        read_variables(tmp_path / "mismatch.bin")
    (tmp_path / "short.bin").write_bytes(good[:-10])
    with pytest.raises(ModelLoadFailed, match="truncated"):
        read_variables(tmp_path / "short.bin")


def test_building_a_module_imports_neither_dynamo_nor_sympy():
    """Building on the meta device ran the layers' random initialisers through torch._refs,
    whose first call imports torch._dynamo and sympy: +71 MiB resident for the life of the
    server and 1-3 s of start, for values the checkpoint overwrites. A fresh interpreter
    loads the real Whisper tiny.en and must not have imported them."""
    import subprocess
    import sys

    script = ("import sys; from pipeserve.checkpoints.hub import resolve; "
              "from pipeserve.pipelines.base import LoadOptions; from pipeserve.models import whisper; "
              f"model = whisper.load_model(resolve({str(wc.embedded_dir())!r}), LoadOptions(), "
              "'conditional_generation'); "
              "assert model.model.decoder.embed_tokens.weight.abs().sum() > 0; "
              "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_initialisers_are_back_after_a_build():
    from torch import nn
    from pipeserve.checkpoints.weights import empty_module

    built = empty_module(lambda: nn.Linear(4, 3))
    assert built.weight.device.type == "cpu" and built.weight.dtype == torch.float32
    fresh = nn.Linear(4, 3)  # initialised as usual again: not left uninitialised
    assert fresh.weight.abs().sum() > 0 and torch.isfinite(fresh.weight).all()
    assert nn.init.normal_(torch.zeros(1000)).std() > 0.5


_HEAP_SCRIPT = """
import sys, torch
from pathlib import Path
from pipeserve.runtime.heap import limit_heap_slack
rss = lambda: int(next(l for l in Path('/proc/self/status').read_text().splitlines()
                       if l.startswith('VmRSS')).split()[1]) // 1024
limited = limit_heap_slack(int(sys.argv[1]))
big = torch.ones(4 << 20); del big  # a freed 16 MiB block: glibc's adaptive threshold rises past 1 MiB
before = rss()
blocks = [torch.ones(256 * 1024) for _ in range(96)]  # 96 activations of 1 MiB, touched
del blocks
print(limited, rss() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_freed_activations_leave_the_resident_set_with_the_heap_limited():
    """runtime/heap.limit_heap_slack (the manager sets it from heap_mmap_threshold_bytes, 256
    KiB by default): blocks past the threshold are mapped, so freeing them returns their
    pages; glibc's adaptive threshold had kept them on the heap, resident."""
    import subprocess
    import sys

    from pipeserve.runtime.heap import _libc

    if _libc() is None:
        pytest.skip("not glibc")
    out = subprocess.run([sys.executable, "-c", _HEAP_SCRIPT, str(256 * 1024)], capture_output=True,
                         text=True, timeout=120, env={**os.environ})
    assert out.returncode == 0, out.stderr[-2000:]
    limited, kept_mib = out.stdout.split()
    assert limited == "True" and int(kept_mib) < 16  # of the 96 MiB freed


def test_the_heap_threshold_setting_is_validated():
    from pipeserve.config import ConfigError, load_settings

    assert load_settings([], environ={}).heap_mmap_threshold_bytes == 256 * 1024
    assert load_settings(["--heap-mmap-threshold-bytes", "0"], environ={}).heap_mmap_threshold_bytes == 0
    with pytest.raises(ConfigError, match="heap_mmap_threshold_bytes|heap-mmap-threshold-bytes"):
        load_settings(["--heap-mmap-threshold-bytes", "-5"], environ={})


def test_a_copied_variable_is_filled_block_by_block_with_the_same_values(tmp_path, monkeypatch):
    """Unaligned or converted CTranslate2 variables are copied COPY_BLOCK_BYTES of the file at a
    time (the load's transient is one block, not the variable twice): the values, dtype and
    layout (column-major where asked) are those of the whole-variable copy."""
    import struct

    from pipeserve.checkpoints import ctranslate2

    def variable(name: bytes, tensor: torch.Tensor, code: int) -> bytes:
        payload = tensor.numpy().tobytes()
        return (struct.pack("<H", len(name) + 1) + name + b"\0" + struct.pack("<B", tensor.dim())
                + struct.pack(f"<{tensor.dim()}I", *tensor.shape) + struct.pack("<BI", code, len(payload)) + payload)

    torch.manual_seed(0)
    head, scalar = torch.randn(301, 7).half(), torch.tensor(6, dtype=torch.int32)
    header = struct.pack("<I", 6) + struct.pack("<H", 12) + b"WhisperSpec\0" + struct.pack("<I", 1)
    body = variable(b"odd", torch.zeros(1, dtype=torch.int8), 1)  # 1 byte: what follows is unaligned
    (tmp_path / "model.bin").write_bytes(header + struct.pack("<I", 3) + body + variable(b"head", head, 4)
                                         + variable(b"heads", scalar, 3) + struct.pack("<I", 0))
    monkeypatch.setattr(ctranslate2, "COPY_BLOCK_BYTES", 5 * 7 * 2 + 3)  # 5 rows a block: 61 blocks, a short last
    _, same = ctranslate2.read_variables(tmp_path / "model.bin")
    _, wide = ctranslate2.read_variables(tmp_path / "model.bin", torch.float32, frozenset({"head"}))
    assert same["head"].dtype == torch.float16 and torch.equal(same["head"], head)
    assert wide["head"].dtype == torch.float32 and torch.equal(wide["head"], head.float())
    assert wide["head"].t().is_contiguous()  # column-major, as asked
    assert int(same["heads"]) == int(wide["heads"]) == 6


def test_clean_code_mappings_are_only_unmodified_executable_file_mappings():
    from pipeserve.runtime.code_pages import clean_code_mappings

    smaps = "\n".join([
        "7f0000000000-7f0000100000 r-xp 00000000 08:01 11 /usr/lib/libtorch_cpu.so", "Anonymous:  0 kB",
        "7f0000100000-7f0000200000 r--p 00100000 08:01 11 /usr/lib/libtorch_cpu.so", "Anonymous:  0 kB",
        "7f0000200000-7f0000300000 r-xp 00000000 08:01 12 /opt/textrel.so", "Anonymous:  8 kB",
        "7f0000300000-7f0000400000 r-xp 00000000 08:01 13 /tmp/gone.so (deleted)", "Anonymous:  0 kB",
        "7f0000400000-7f0000500000 rw-p 00000000 08:01 14 /models/model.bin", "Anonymous:  0 kB",
        "7f0000500000-7f0000600000 r-xp 00000000 00:00 0 ", "Anonymous:  0 kB",  # JIT code: no file
        "7f0000600000-7f0000700000 r-xp 00000000 08:01 15 /usr/lib/libc.so.6", "Rss:  4 kB",
    ])
    assert clean_code_mappings(smaps) == [(0x7F0000000000, 0x7F0000100000), (0x7F0000600000, 0x7F0000700000)]


_CODE_PAGES_SCRIPT = """
import torch
from pathlib import Path
from pipeserve.runtime.code_pages import release_code_pages
status = lambda key: int(next(l for l in Path('/proc/self/status').read_text().splitlines()
                              if l.startswith(key)).split()[1]) // 1024
x = torch.randn(64, 64)
before, anon = status('RssFile'), status('RssAnon')
released = release_code_pages()
after = status('RssFile')
y = (x @ x).sum().item()  # the code that runs again comes back: the process works as before
print(released >> 20, before, after, status('RssAnon') - anon, torch.allclose(torch.tensor(y), (x @ x).sum()))
"""


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs /proc")
def test_released_code_pages_leave_the_resident_set_and_come_back_when_run():
    """runtime/code_pages.release_code_pages (the manager calls it around each load): the code
    torch's import ran leaves RssFile; the anonymous memory (data, heap) is untouched."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _CODE_PAGES_SCRIPT], capture_output=True, text=True, timeout=120,
                         env={**os.environ})
    assert out.returncode == 0, out.stderr[-2000:]
    released_mib, before, after, anon_change, same = out.stdout.split()
    assert int(released_mib) > 50 and same == "True"  # libtorch alone maps well over 50 MiB of code
    assert int(before) - int(after) > 20  # of torch's import-time code pages (~45 MiB resident)
    assert abs(int(anon_change)) < 8


def test_the_manager_releases_code_pages_around_a_load_unless_told_not_to(monkeypatch, tmp_path):
    import asyncio

    from pipeserve.config import Settings
    from pipeserve.runtime import manager as manager_module

    directory = wc.build(tmp_path / "whisper", multilingual=False)
    for enabled, expected in ((True, 2), (False, 0)):
        calls = []
        monkeypatch.setattr(manager_module, "release_code_pages", lambda: calls.append(1) or 0)

        async def load():
            manager = manager_module.ModelManager(Settings(embedded_defaults=False, release_code_pages=enabled))
            try:
                return (await manager.load(str(directory))).state
            finally:
                await manager.close()

        assert asyncio.run(load()) == manager_module.ModelState.READY
        assert len(calls) == expected  # before the load and after it


def test_the_code_pages_setting_is_validated():
    from pipeserve.config import ConfigError, load_settings

    assert load_settings([], environ={}).release_code_pages is True
    assert load_settings(["--release-code-pages", "false"], environ={}).release_code_pages is False
    assert load_settings([], environ={"PIPESERVE_RELEASE_CODE_PAGES": "0"}).release_code_pages is False
    with pytest.raises(ConfigError, match="release.code.pages"):
        load_settings(["--release-code-pages", "maybe"], environ={})
