"""protoc for the contracts: protos/pipeserve/v1/*.proto -> pipeserve/v1/*_pb2*.py(i) here.

Build-time only (never shipped, never imported at run time): the client's setup.py runs it
when its wheel or editable install is built, and `python -m pipeserve.codegen` runs it after a
.proto changes. The proto package `pipeserve.v1` becomes the Python package `pipeserve.v1`,
which the generated modules import each other by; the client distribution ships it as a
portion of the `pipeserve` namespace (no pipeserve/__init__.py here: the server owns that).
Needs grpcio-tools, never torch. Never edit its output.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
# In the repository the contracts live two levels up; an sdist carries them in ./protos (a
# link to the same folder in the repository).
PROTO_ROOT = next((p for p in (HERE / "protos", HERE.parents[1] / "protos") if (p / "pipeserve" / "v1").is_dir()),
                  HERE.parents[1] / "protos")
OUT_ROOT = HERE


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
    (out_dir / "__init__.py").write_text('"""Generated from protos/pipeserve/v1 by build_protos.py; do not edit."""\n')
    return sorted(out_dir.glob("*_pb2*.py"))


def runtime_floors(out_root: Path = OUT_ROOT) -> tuple[str, str]:
    """(grpcio, protobuf): the oldest runtimes the generated code accepts, read from what it
    checks at import. The _pb2_grpc modules refuse a grpcio older than the grpcio-tools that
    wrote them, the _pb2 modules a protobuf older than protoc's, so the wheel requires both."""
    out_dir = out_root / "pipeserve" / "v1"
    grpc_code = (out_dir / "common_pb2_grpc.py").read_text()
    protobuf_code = (out_dir / "common_pb2.py").read_text()
    grpcio = re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'", grpc_code, re.M)
    protobuf = re.search(r"^# Protobuf Python Version: (\S+)", protobuf_code, re.M)
    if not grpcio or not protobuf:
        raise RuntimeError(f"cannot read the runtime versions the code in {out_dir} was generated for")
    return grpcio.group(1), protobuf.group(1)


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(OUT_ROOT))
