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
        self.register_buffer("ids", torch.arange(4), persistent=False)

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
