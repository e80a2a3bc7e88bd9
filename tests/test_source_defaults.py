"""The quantized form a load gets when the request chooses none (runtime/loading.with_source_defaults):
a GGUF file stored in quantized blocks loads "grouped" (its own grids) where the family takes the
form and pipeserve's native kernels run it; a float GGUF, other sources, other devices or dtypes,
machines without the kernels, and every explicit choice load as asked or float."""
from __future__ import annotations

import pytest

from generation_checkpoints import build
from gguf_checkpoints import build_gemma3_gguf, build_llama_gguf
from native_kernels import require_native_kernels
from pipeserve.checkpoints.hub import resolve
from pipeserve.checkpoints.registry import family_takes
from pipeserve.layers import grid_native
from pipeserve.pipelines.base import LoadOptions
from pipeserve.runtime.loading import with_source_defaults


def _form(path, **options) -> str:
    resolved = with_source_defaults(resolve(str(path)), LoadOptions(**options))
    assert resolved.load_in_8bit == (resolved.quantization == "int8")
    return resolved.quantization


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("source-defaults")
    gemma_q8, _ = build_gemma3_gguf(root / "gemma-q8", "Q8_0")
    llama_q4, _ = build_llama_gguf(root / "llama-q4", "Q4_0")
    gemma_f32, _ = build_gemma3_gguf(root / "gemma-f32", "F32")
    build("gemma3", root / "safetensors")
    return {"gemma_q8": gemma_q8, "llama_q4": llama_q4, "gemma_f32": gemma_f32, "safetensors": root / "safetensors"}


def test_quantized_gguf_files_default_to_their_own_grids(files):
    require_native_kernels()
    assert _form(files["gemma_q8"]) == "grouped"
    assert _form(files["llama_q4"]) == "grouped"


def test_float_files_and_other_sources_load_float(files):
    assert _form(files["gemma_f32"]) == "none"  # grids would be a rounding the file never had
    assert _form(files["safetensors"]) == "none"


def test_a_choice_in_the_request_wins(files):
    assert _form(files["gemma_q8"], quantization="none") == "none"
    assert _form(files["gemma_q8"], load_in_8bit=False) == "none"
    assert _form(files["gemma_q8"], load_in_8bit=True) == "int8"


def test_loads_the_default_cannot_serve_get_float_not_an_error(files, monkeypatch):
    assert _form(files["gemma_q8"], dtype="bfloat16") == "none"
    assert _form(files["gemma_q8"], device="auto") == "none"
    monkeypatch.setattr(grid_native, "available", lambda: False)  # no kernels: int4 planes are slower
    assert _form(files["gemma_q8"]) == "none"


def test_family_takes_reads_the_familys_own_classes():
    assert family_takes("gemma3_text", "grid_int4") and family_takes("llama", "grid_int4")
    assert not family_takes("gpt2", "grid_int4") and not family_takes("opt", "grid_int4")
