"""How real_gemma.py drives a reference engine that runs in its own process (llama.cpp in its own
virtualenv, transformers in the project's): one JSON request per line on the child's stdin, one
JSON reply per line on its stdout, marked so that anything a library prints there is skipped.
A child per engine keeps each engine's resident memory its own and lets the bench interleave
rounds across engines that stay loaded. Standard library only (the llama.cpp virtualenv has
neither torch nor pipeserve).

Operations every side answers: "info" (engine, versions, load seconds, threads), "tokenize"
(the prompt ids the engine itself would feed, BOS included), "generate" (greedy, exactly
`new_tokens` tokens: ttft_s, seconds, ids, text, prompt_tokens) and "memory" (its own VmRSS and
VmHWM).
"""
from __future__ import annotations

import json
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable

MARK = "@@side "
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for bench_server

from bench_server import process_memory  # noqa: E402


def serve(handlers: dict[str, Callable[..., dict]]) -> None:
    """The child's loop: answer requests until stdin closes. An operation that fails answers
    {"error": ...} and the loop goes on."""
    handlers = {"memory": lambda: process_memory("self"), **handlers}
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints from libraries go to the log, never into a reply
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        try:
            reply = handlers[op](**request)
        except Exception:  # reported to the parent, which stops the bench with it
            reply = {"error": traceback.format_exc()}
        out.write(MARK + json.dumps(reply) + "\n")
        out.flush()


class Side:
    """The parent's handle on one child engine."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.name = name
        self.log_path = log_path
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=open(log_path, "w"), text=True, env=env)

    @property
    def pid(self) -> int:
        return self.process.pid

    def call(self, op: str, **arguments) -> dict:
        self.process.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
        self.process.stdin.flush()
        for line in self.process.stdout:
            if line.startswith(MARK):
                reply = json.loads(line[len(MARK):])
                if "error" in reply:
                    raise RuntimeError(f"{self.name} {op} failed:\n{reply['error']}")
                return reply
        raise RuntimeError(f"{self.name} exited with {self.process.wait()}; see {self.log_path}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
