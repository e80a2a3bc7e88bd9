"""Builds pipeserve-client: generates the pipeserve.v1 stubs from the contracts first (package
discovery and the wheel need them to exist), then requires the grpcio and protobuf runtimes
that the generated code checks for at import."""
import sys
from pathlib import Path

from setuptools import setup

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_protos import generate, runtime_floors  # noqa: E402

generate()
GRPCIO, PROTOBUF = runtime_floors()
MAJOR = lambda version: int(version.split(".")[0])  # noqa: E731
# grpcio-status is versioned with grpcio but not released for every grpcio patch (grpcio 1.85.4
# came out with no grpcio-status 1.85.4), and the generated code checks grpcio alone: its floor
# is the release series.
SERIES = ".".join(GRPCIO.split(".")[:2])

setup(install_requires=[
    f"grpcio>={GRPCIO},<2",
    f"grpcio-status>={SERIES},<2",  # ErrorInfo details of failed calls (and googleapis-common-protos)
    # A protobuf runtime of another major version refuses the generated code.
    f"protobuf>={PROTOBUF},<{MAJOR(PROTOBUF) + 1}",
])
