"""Cold start (issue #16 item 4): what a fresh server process pays before its first answer.
Each check runs in a fresh interpreter, since what is at stake is which modules a process
imports and when."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    features need (PIL for images, aiohttp for the HTTP front door, gguf, torch's compiler)."""
    result = _fresh_python("""
import json, sys
import pipeserve.server as server
first = sorted(m for m in ("torch", "numpy", "PIL", "aiohttp", "gguf") if m in sys.modules)
server._import_runtime(); server._import_servicers()
then = sorted(m for m in ("PIL", "aiohttp", "gguf", "sympy", "torch._dynamo", "transformers") if m in sys.modules)
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
