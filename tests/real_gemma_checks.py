"""The real Gemma 3 270M GGUF (the embedded text-generation default) for the slow tests that
hold a quantized form against the float path (test_gguf_gemma_int8.py, test_gguf_gemma_grouped.py):
the file, the prompts, teacher-forced greedy agreement, and a fresh process's load peak."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived",
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg",
]


def embedded_gemma_file() -> Path:
    from pipeserve.checkpoints.embedded import embedded_model_dir

    folder = embedded_model_dir("text-generation")  # assembled from the chunk packages, sha256 checked
    [path] = folder.glob("*.gguf")
    return path


@dataclass(frozen=True)
class Agreement:
    agree: int
    total: int
    identical_prefix: int  # tokens before each prompt's first disagreement, summed
    worst: float  # the largest max|dlogit| / max|logit| over the prompts

    def __str__(self) -> str:
        return (f"top-1 agreement {self.agree}/{self.total}, identical greedy prefix {self.identical_prefix} "
                f"tokens, worst max|dlogit|/max|logit| {self.worst:.3f}")


def teacher_forced_agreement(float_pipe, other, prompts: list[str], new_tokens: int) -> Agreement:
    """The float path's greedy continuation of each prompt, read back by `other` in one pass:
    how often its top-1 choice agrees (a free-running comparison would only count tokens up to
    the first near-tie)."""
    agree = total = identical_prefix = 0
    worst = 0.0
    for prompt in prompts:
        [result] = float_pipe.generate([prompt], {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens})
        tokens = [t.token for t in result.sequences[0].tokens]
        ids = torch.tensor([float_pipe.encode(prompt) + tokens])
        with torch.no_grad():
            exact = float_pipe.model(ids)[0, -new_tokens - 1:-1]
            quantized = other.model(ids)[0, -new_tokens - 1:-1]
        assert exact.argmax(-1).tolist() == tokens, "the float model's own greedy choices"
        matches = (quantized.argmax(-1) == exact.argmax(-1)).tolist()
        agree, total = agree + sum(matches), total + len(matches)
        identical_prefix += matches.index(False) if False in matches else len(matches)
        worst = max(worst, ((quantized - exact).abs().max() / exact.abs().max()).item())
    return Agreement(agree, total, identical_prefix, worst)


_MEASURE = """
import json, sys
from pathlib import Path
from harness import load_pipeline
pipe = load_pipeline(Path(sys.argv[1]), **json.loads(sys.argv[2]))
status = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith("Vm"))
kib = lambda key: int(status[key].split()[0]) * 1024
print(json.dumps({"hwm": kib("VmHWM"), "rss": kib("VmRSS"), "memory_bytes": pipe.memory_bytes(),
                  "usage": pipe.memory_usage()}))
"""


def load_peak(gemma_file: Path, options: dict) -> dict:
    """A fresh process loads the file with `options` (LoadOptions fields): its high-water mark
    and resident set once loaded ("hwm", "rss"), and the pipeline's own accounting."""
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(gemma_file), json.dumps(options)], capture_output=True,
                          text=True, timeout=600, cwd=str(Path(__file__).parent))
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def largest_tensor_bytes(gemma_file: Path) -> int:
    """The float32 size of the file's largest tensor (the 262k x 640 embedding)."""
    from pipeserve.checkpoints.gguf import open_gguf

    return max(4 * torch.Size(info.shape).numel() for info in open_gguf(gemma_file).tensors.values())
