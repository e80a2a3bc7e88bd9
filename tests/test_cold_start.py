"""Cold start (issue #16 item 4): what a fresh server process pays before its first answer.
Each check runs in a fresh interpreter, since what is at stake is which modules a process
imports and when."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _fresh_python(code: str) -> dict:
    """Runs `code` in a fresh interpreter with this tree's packages; it prints one JSON line."""
    env = dict(os.environ, HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "service"), str(ROOT / "clients" / "python")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_building_a_module_on_meta_does_not_import_the_compiler():
    """nn.Embedding initialises its weight with normal_, whose meta kernel imports
    torch._dynamo on first use (1-2 s), and to_empty's empty_like imports torch.fx's symbolic
    shapes and sympy (1-1.5 s): empty_module avoids both, and still gives every tensor real
    storage of its shape, floats in the asked dtype, a tied weight still tied."""
    result = _fresh_python("""
import json, sys
import torch
from torch import nn

class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8, padding_idx=0)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight
        self.norm = nn.LayerNorm(8)
        self.register_buffer("ids", torch.zeros(4, dtype=torch.int64), persistent=False)

from pipeserve.checkpoints.weights import empty_module
m = empty_module(Tied, dtype=torch.bfloat16)
tensors = [*m.parameters(), *m.buffers()]
print(json.dumps({"heavy": sorted(name for name in ("torch._dynamo", "sympy", "torch.fx.experimental.symbolic_shapes")
                                  if name in sys.modules),
                  "devices": sorted({t.device.type for t in tensors}),
                  "dtypes": sorted({str(t.dtype) for t in tensors}),
                  "shape": list(m.embed.weight.shape), "tied": m.head.weight is m.embed.weight,
                  "parameters": sum(isinstance(t, nn.Parameter) for t in m.parameters()),
                  "training": m.training}))
""")
    assert result["heavy"] == []
    assert result["devices"] == ["cpu"] and result["shape"] == [16, 8]
    assert result["dtypes"] == ["torch.bfloat16", "torch.int64"]
    assert result["tied"] is True and result["parameters"] == 3 and result["training"] is False


def test_the_server_module_imports_no_torch_and_the_servicers_nothing_a_speech_server_skips():
    """pipeserve.server binds its port before importing torch, so importing it must not pull
    torch in; the servicers import torch but not what only other tasks or off-by-default
    features need (PIL for images, aiohttp for the HTTP front door, prometheus_client for the
    metrics endpoint, gguf, torch's compiler)."""
    result = _fresh_python("""
import json, sys
import pipeserve.server as server
first = sorted(m for m in ("torch", "numpy", "PIL", "aiohttp", "gguf", "prometheus_client") if m in sys.modules)
server._import_runtime(); server._import_servicers()
then = sorted(m for m in ("PIL", "aiohttp", "gguf", "sympy", "torch._dynamo", "transformers", "prometheus_client")
              if m in sys.modules)
print(json.dumps({"first": first, "then": then, "torch": "torch" in sys.modules}))
""")
    assert result == {"first": [], "then": [], "torch": True}


def test_a_server_process_listens_before_its_runtime_is_imported(tmp_path):
    """The real entry point: the start-up log says the port listened before the runtime was
    imported, and the process then serves (health SERVING)."""
    from ops_testing import ServerProcess

    server = ServerProcess()
    try:
        server.wait_serving(timeout=180)
        log = server.output()
        order = [log.find(f"startup_timeline: {stage}") for stage in ("listening", "runtime imported",
                                                                      "services bound")]
        assert -1 not in order and order == sorted(order), log[-3000:]
    finally:
        server.terminate()
        server.kill()


def test_a_speech_only_server_process_loads_and_transcribes_without_other_tasks_modules():
    """What a speech-only server holds after loading Whisper tiny.en and transcribing: none of
    the modules only other tasks or off-by-default features need, and no compiler."""
    result = _fresh_python("""
import json, sys
import torch
import pipeserve.server as server
server._import_runtime(); server._import_servicers()
from pipeserve.checkpoints.hub import resolve
from pipeserve.pipelines.base import LoadOptions
from pipeserve.runtime.loading import load_pipeline
pipeline = load_pipeline(resolve("embedded/whisper-tiny.en", None, offline=True), LoadOptions(),
                         "automatic-speech-recognition")
text = pipeline.transcribe([torch.zeros(16000)])[0].text
skipped = ("PIL", "aiohttp", "gguf", "sympy", "torch._dynamo", "transformers", "prometheus_client", "safetensors")
print(json.dumps({"held": sorted(m for m in skipped if m in sys.modules), "text": isinstance(text, str)}))
""")
    assert result == {"held": [], "text": True}


def test_the_tied_head_converts_into_column_major_exactly_block_by_block(tmp_path):
    """CTranslate2's float16 head is converted to float32 straight into the column-major layout
    in blocks of rows: every value equals a plain conversion's, across a last partial block."""
    import struct

    from pipeserve.checkpoints import ctranslate2

    rows, cols = 2 * ctranslate2._TRANSPOSE_BLOCK_ROWS + 37, 12
    head = torch.randn(rows, cols).half()
    name = b"decoder/embeddings/weight"
    variable = (struct.pack("<H", len(name) + 1) + name + b"\0" + struct.pack("<B2I", 2, rows, cols)
                + struct.pack("<BI", 4, head.numel() * 2) + head.numpy().tobytes())
    path = tmp_path / "model.bin"
    path.write_bytes(struct.pack("<I", 6) + struct.pack("<H", 12) + b"WhisperSpec\0" + struct.pack("<I", 1)
                     + struct.pack("<I", 1) + variable + struct.pack("<I", 0))
    _, tensors = ctranslate2.read_variables(path, torch.float32, frozenset({name.decode()}))
    converted = tensors[name.decode()]
    assert converted.dtype == torch.float32 and converted.shape == (rows, cols) and converted.t().is_contiguous()
    assert torch.equal(converted, head.float())


def test_the_whisper_tokenizer_takes_the_added_tokens_of_tokenizer_json(tmp_path):
    """The special tokens come from the parsed tokenizer (not a second parse of the file): the
    same content -> id table as tokenizer.json's added_tokens, English and multilingual."""
    import whisper_checkpoints as wc
    from pipeserve.pipelines.whisper.tokenizer import WhisperTokenizer

    for label, data in (("english", json.loads((wc.tokenizer_dir() / "tokenizer.json").read_text("utf-8"))),
                        ("multilingual", wc.multilingual_tokenizer_json())):
        path = tmp_path / f"{label}.json"
        path.write_text(json.dumps(data), encoding="utf-8")
        tok = WhisperTokenizer(path)
        assert tok.added == {t["content"]: t["id"] for t in data["added_tokens"]}, label
    assert tok.is_multilingual and tok.lang_to_id["en"] == tok.sot + 1


def test_a_whisper_load_with_a_broken_tokenizer_fails_as_such_and_leaves_no_thread(tmp_path):
    """The tokenizer loads on a helper thread beside the weights: its failure is still the
    load's BAD_TOKENIZER error, and the helper thread does not outlive the load."""
    import threading

    import pytest
    import whisper_checkpoints as wc
    from pipeserve.checkpoints.hub import resolve
    from pipeserve.errors import ModelLoadFailed
    from pipeserve.pipelines.base import LoadOptions
    from pipeserve.runtime.loading import load_pipeline

    for name in ("model.bin", "config.json"):
        (tmp_path / name).symlink_to(wc.embedded_dir() / name)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ', encoding="utf-8")
    files = resolve(str(tmp_path), None, offline=True)
    with pytest.raises(ModelLoadFailed) as failed:
        load_pipeline(files, LoadOptions(), "automatic-speech-recognition")
    assert failed.value.reason == "BAD_TOKENIZER"
    assert not [t for t in threading.enumerate() if t.name.startswith("pipeserve-tokenizer")]
