"""Regenerates the protobuf/gRPC code after a .proto changes, in a source checkout:
protos/pipeserve/v1/*.proto -> clients/python/pipeserve/v1/ (git-ignored).

The generator belongs to the pipeserve-client build (clients/python/build_protos.py, run by
its setup.py whenever its wheel or editable install is built); this entry point
(`python -m pipeserve.codegen`) runs the same file so there is one generator.
"""
from __future__ import annotations

import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "clients" / "python" / "build_protos.py"


def generate() -> list[Path]:
    if not GENERATOR.is_file():
        raise RuntimeError(f"{GENERATOR} is missing: codegen runs in a source checkout of pipeserve")
    return runpy.run_path(str(GENERATOR))["generate"]()


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(ROOT))
