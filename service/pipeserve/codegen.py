"""protoc for the contracts: protos/pipeserve/v1/*.proto -> service/pipeserve/v1/*_pb2*.py(i).

Run by the install step (setup.py) and by `python -m pipeserve.codegen`; never edit its output.
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "service"


def generate(proto_root: Path = PROTO_ROOT, out_root: Path = OUT_ROOT) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted((proto_root / "pipeserve" / "v1").glob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files under {proto_root}")
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    out_dir = out_root / "pipeserve" / "v1"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *map(str, protos),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(p.name for p in protos))
    (out_dir / "__init__.py").write_text('"""Generated from protos/pipeserve/v1 by pipeserve.codegen; do not edit."""\n')
    return sorted(out_dir.glob("*_pb2*.py"))


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(ROOT))
