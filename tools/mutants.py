"""Mutation check for the parity tests: each mutant below is a plausible bug in our model or
decoding code (a dropped bias, an ignored norm weight, a wrong epsilon, interleaved heads, a
skipped scale, an off-by-one alignment head, a narrower quantizer, no length normalisation).
The script copies service/, tests/ and clients/ to a temp directory, applies one mutant there,
runs the parity tests that should catch it, and reports KILLED (some test failed) or SURVIVED.
The working tree is never modified.

    .venv/bin/python tools/mutants.py            # every mutant
    .venv/bin/python tools/mutants.py gpt2-ln    # the ones whose name contains "gpt2-ln"

Exit status 1 if any mutant survives (or no longer applies: the replaced text must occur exactly
once, so a refactor that moves the code fails loudly instead of testing nothing).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments that must kill it


MUTANTS = [
    Mutant("gpt2-ln-affine-dropped", "service/pipeserve/models/gpt2.py",
           "x = x + self.attn(self.ln_1(x), view)\n        return x + self.mlp(self.ln_2(x))",
           "x = x + self.attn(nn.functional.layer_norm(x, x.shape[-1:], eps=self.ln_1.eps), view)\n"
           "        return x + self.mlp(nn.functional.layer_norm(x, x.shape[-1:], eps=self.ln_2.eps))",
           ("tests/test_generation_models.py", "-k", "gpt2 and full_pass")),
    Mutant("vit-layernorm-before-affine-dropped", "service/pipeserve/models/vit.py",
           "x = x + self.attention(self.layernorm_before(x))",
           "x = x + self.attention(F.layer_norm(x, x.shape[-1:], eps=self.layernorm_before.eps))",
           ("tests/test_vit.py",)),
    Mutant("bert-query-bias-dropped", "service/pipeserve/models/bert.py",
           "split(self.query(x))", "split(self.query(x) - self.query.bias)",
           ("tests/test_encoder_models.py",)),
    Mutant("bert-heads-interleaved", "service/pipeserve/models/bert.py",
           "y.view(b, t, self.heads, h // self.heads).transpose(1, 2)",
           "y.view(b, t, h // self.heads, self.heads).transpose(2, 3).transpose(1, 2)",
           ("tests/test_encoder_models.py",)),
    Mutant("llama-rms-eps-default", "service/pipeserve/models/llama.py",
           "torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)",
           "torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)",
           ("tests/test_generation_models.py", "-k", "llama and full_pass")),
    Mutant("whisper-self-attn-layernorm-bias-dropped", "service/pipeserve/models/whisper.py",
           # the encoder layer's (the decoder layer's own line is followed by other statements)
           "h = self.self_attn_layer_norm(x)\n        q, k, v = self.self_attn.qkv(h)\n        x = x +",
           "h = self.self_attn_layer_norm(x) - self.self_attn_layer_norm.bias\n        q, k, v = self.self_attn.qkv(h)\n"
           "        x = x +",
           ("tests/test_whisper_parity.py", "-k", "logits_parity")),
    Mutant("wav2vec2-stable-layernorm-weight-ignored", "service/pipeserve/models/wav2vec2.py",
           "x = x + self.attention(self.layer_norm(x), mask)",
           "x = x + self.attention(torch.nn.functional.layer_norm(x, x.shape[-1:], None, self.layer_norm.bias, "
           "self.layer_norm.eps), mask)",
           ("tests/test_wav2vec2_model.py",)),
    Mutant("bart-encoder-final-layernorm-bias-dropped", "service/pipeserve/models/bart.py",
           "x = self.final_layer_norm(x + self.fc2(linear_activation(self.fc1, x, self.act_name, self.act)))",
           "x = self.final_layer_norm(x + self.fc2(linear_activation(self.fc1, x, self.act_name, self.act))) "
           "- self.final_layer_norm.bias",
           ("tests/test_zero_shot.py", "-k", "bart")),
    Mutant("opt-final-layernorm-weight-ignored", "service/pipeserve/models/opt.py",
           "return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))",
           "return x + self.fc2(self.act(self.fc1(torch.nn.functional.layer_norm(x, x.shape[-1:], None, "
           "self.final_layer_norm.bias, self.final_layer_norm.eps))))",
           ("tests/test_generation_models.py", "-k", "opt and full_pass")),
    Mutant("gpt2-inverse-layer-idx-scale-skipped", "service/pipeserve/models/gpt2.py",
           "scale /= float(layer_idx + 1)", "scale /= 1.0",
           ("tests/test_generation_models.py", "-k", "config_variant and gpt2")),
    Mutant("whisper-alignment-head-layer-off-by-one", "service/pipeserve/pipelines/whisper/word_timing.py",
           "attentions[layer][0, head] for layer, head in s.alignment_heads",
           "attentions[layer - 1][0, head] for layer, head in s.alignment_heads",
           # real weights: random ones attend near-uniformly, so DTW cannot tell heads apart
           ("tests/test_grpc_speech_recognition.py", "-k", "word_timestamps")),
    Mutant("int8-quantizer-7-bit", "service/pipeserve/layers/quantization.py",
           "QMAX = 127", "QMAX = 63",
           ("tests/test_generation_int8_device_map.py", "-k", "int8")),
    Mutant("beam-length-normalisation-dropped", "service/pipeserve/pipelines/whisper/token_decoders.py",
           "norm = top_scores / ((self.step + 1) ** penalty)", "norm = top_scores",
           ("tests/test_whisper_real.py", "-k", "length_penalty")),
]


def _copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for part in ("service", "tests", "clients"):
        shutil.copytree(ROOT / part, dest / part, ignore=ignore, symlinks=True)
    for name in ("pyproject.toml", "setup.py", "setup.cfg", "pytest.ini"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dest / name)


def apply(mutant: Mutant, dest: Path) -> None:
    target = dest / mutant.path
    text = target.read_text(encoding="utf-8")
    count = text.count(mutant.old)
    if count != 1:
        raise SystemExit(f"{mutant.name}: the text to mutate occurs {count} times in {mutant.path}; update MUTANTS")
    target.write_text(text.replace(mutant.old, mutant.new), encoding="utf-8")


def run(mutant: Mutant) -> tuple[bool, float, str]:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        dest = Path(tmp)
        _copy_tree(dest)
        apply(mutant, dest)
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=f"{dest / 'service'}:{dest / 'clients' / 'python'}")
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutant.tests],
                              cwd=dest, env=env, capture_output=True, text=True)
        elapsed = time.monotonic() - start
        lines = proc.stdout.strip().splitlines() or [""]
        # the first failure's assertion (E ...) says whether it died of parity or of an error
        reason = next((l.strip() for l in lines if l.startswith("E ")), "")[:100]
        last = f"{lines[-1]}  {reason}".strip()
        if proc.returncode == 5:  # no tests collected: the selection is stale, not a kill
            raise SystemExit(f"{mutant.name}: no tests selected by {' '.join(mutant.tests)}")
        return proc.returncode != 0, elapsed, last


def main(argv: list[str]) -> int:
    chosen = [m for m in MUTANTS if not argv or any(a in m.name for a in argv)]
    survivors = []
    for mutant in chosen:
        killed, elapsed, summary = run(mutant)
        print(f"{'KILLED  ' if killed else 'SURVIVED'} {mutant.name:42s} {elapsed:6.1f}s  {summary}", flush=True)
        if not killed:
            survivors.append(mutant.name)
    print(f"{len(chosen) - len(survivors)}/{len(chosen)} mutants killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
