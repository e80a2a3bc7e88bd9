"""Builds the pipeserve server distribution. Its metadata that is not in pyproject.toml lives
here because it is computed: the version is read from the one place it is written (the
client's _version.py), and the server requires pipeserve-client at exactly that version (the
generated pipeserve.v1 code it serves comes from there)."""
import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
VERSION_FILE = HERE / "clients" / "python" / "pipeserve_client" / "_version.py"
# An sdist of the server has no clients/ folder: its PKG-INFO kept the version it was made with.
VERSION = (re.search(r'^__version__ = "([^"]+)"', VERSION_FILE.read_text(), re.M) if VERSION_FILE.is_file()
           else re.search(r"^Version: (\S+)", (HERE / "PKG-INFO").read_text(), re.M)).group(1)

# Run-time dependencies. Upper bounds stop a fresh install from taking a release we have not
# tested: the next major version, or for 0.x packages (and torch, whose minor releases change
# kernels and numerics) the next minor one. Tested together: torch 2.13.0, grpcio 1.85,
# protobuf 7.36, huggingface_hub 2.4, safetensors 0.8, tokenizers 0.23, pillow 13,
# soundfile 0.14, numpy 2.4, prometheus-client 0.26, aiohttp 3.14, jinja2 3.1.
RUNTIME = [
    # A range: a GPU user keeps the CUDA build they have; scripts/setup installs the CPU
    # wheel first on machines without a GPU (scripts/torch-choice).
    "torch>=2.1,<2.14",
    "grpcio>=1.60,<2",
    "grpcio-health-checking>=1.60,<2",
    "grpcio-reflection>=1.60,<2",
    "grpcio-status>=1.60,<2",
    "protobuf>=4.25,<8",
    "huggingface_hub>=0.20,<3",
    "safetensors>=0.4,<0.9",
    "tokenizers>=0.15,<0.24",
    "pillow>=10,<14",
    "soundfile>=0.12,<0.15",
    "numpy>=1.24,<3",
    "prometheus-client>=0.20,<0.27",  # /metrics endpoint (pipeserve.serving.metrics); see README
    # llama.cpp's GGUF format: block types and dequantization (checkpoints/gguf.py); pure Python + numpy.
    "gguf>=0.17,<0.20",
    "aiohttp>=3.9,<4",  # the OpenAI-compatible HTTP/JSON front door (pipeserve.http); see README
    # Chat templates (pipeserve.inputs.chat); 3.1.6 closed sandbox escapes, as transformers requires.
    "jinja2>=3.1.6,<4",
]

setup(version=VERSION, install_requires=[f"pipeserve-client=={VERSION}", *RUNTIME])
