"""Generates the protobuf/gRPC Python code as part of every install (editable or not).

The generated modules land in service/pipeserve/v1/ (git-ignored): proto package
`pipeserve.v1` becomes Python package `pipeserve.v1`, so generated imports resolve.
"""
from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "service"))


class BuildWithProtos(build_py):
    def run(self):
        from pipeserve.codegen import generate

        generate()
        # packages are discovered before run(); make sure the generated one ships.
        if "pipeserve.v1" not in (self.packages or []):
            self.packages = list(self.packages or []) + ["pipeserve.v1"]
        super().run()


setup(
    cmdclass={"build_py": BuildWithProtos},
    packages=sorted(set(find_packages("service")) | {"pipeserve.v1"})
    + find_packages("clients/python"),
)
