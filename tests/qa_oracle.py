"""The question-answering oracle: transformers 5 removed the question-answering pipeline, so
the reference is transformers 4.x's `pipeline("question-answering")` (the version pinned in
tests/qa-oracle.txt), run in a subprocess from a side install inside .venv that does
not touch the main environment (scripts/setup --test makes it):

    pip install --no-deps --target .venv/oracles/transformers4 -r tests/qa-oracle.txt

(PIPESERVE_TRANSFORMERS4 overrides the folder.) The checkpoint and tokenizer are the same
files pipeserve loads; the tokenizer is read as PreTrainedTokenizerFast because 4.57 does not
know the "TokenizersBackend" class name that transformers 5 writes.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ORACLE = Path(os.environ.get("PIPESERVE_TRANSFORMERS4",
                             Path(__file__).resolve().parents[1] / ".venv" / "oracles" / "transformers4"))

PINS = Path(__file__).resolve().parent / "qa-oracle.txt"


def pinned_version() -> str:
    """The transformers version tests/qa-oracle.txt pins (the one place it is written)."""
    match = re.search(r"^transformers==(\S+)$", PINS.read_text(), re.M)
    if match is None:
        raise RuntimeError(f"{PINS} pins no transformers version")
    return match.group(1)


_SCRIPT = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
import transformers
assert transformers.__version__ == sys.argv[2], (transformers.__version__, sys.argv[2])
from transformers import AutoModelForQuestionAnswering, PreTrainedTokenizerFast, pipeline
directory, cases = sys.argv[1], json.loads(sys.stdin.read())
tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
model = AutoModelForQuestionAnswering.from_pretrained(directory).eval()
qa = pipeline("question-answering", model=model, tokenizer=tokenizer)
out = []
for case in cases:
    result = qa(question=case["question"], context=case["context"], **case.get("kwargs", {}))
    out.append(result if isinstance(result, list) else [result])
print(json.dumps(out))
"""


def available() -> bool:
    return (ORACLE / "transformers" / "__init__.py").is_file()


def run(directory: Path, cases: list[dict]) -> list[list[dict]]:
    """Each case {question, context, kwargs} -> the list of answers the pinned transformers 4.x gives."""
    if not available():
        raise RuntimeError(f"the transformers {pinned_version()} oracle is not installed in {ORACLE}; "
                           "see tests/qa_oracle.py")
    env = {**os.environ, "PYTHONPATH": str(ORACLE), "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(directory), pinned_version()], input=json.dumps(cases),
                          capture_output=True, text=True, env=env, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"QA oracle failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
