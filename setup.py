"""Generates the protobuf/gRPC Python code as part of every install (editable or not).

The generated modules land in service/pipeserve/v1/ (git-ignored): proto package
`pipeserve.v1` becomes Python package `pipeserve.v1`, so generated imports resolve. They are
generated before setup() runs because package discovery (egg_info) needs them to exist.
"""
import sys
from pathlib import Path

from setuptools import find_packages, setup

sys.path.insert(0, str(Path(__file__).parent / "service"))
from pipeserve.codegen import generate  # noqa: E402

generate()

setup(packages=find_packages("service") + find_packages("clients/python"))
