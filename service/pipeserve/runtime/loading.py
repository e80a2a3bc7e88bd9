"""Checkpoint files -> a ready task pipeline. The manager adds residency and budgets on top."""
from __future__ import annotations

import dataclasses

from ..checkpoints.formats import is_ctranslate2_whisper
from ..checkpoints.hub import ModelFiles
from ..checkpoints.gguf import open_gguf
from ..checkpoints.registry import family_takes, infer_task, pipeline_class
from ..checkpoints.weights import dtype_name
from ..config import chosen_quantization
from ..errors import ModelLoadFailed, WrongTask
from ..layers import grid_native
from ..layers.grid_int4 import unavailable_reason as grid_int4_unavailable
from ..pipelines.base import LoadOptions, Pipeline
from ..tasks import Task

def model_type_of(files: ModelFiles) -> str:
    model_type = files.config.get("model_type")
    if model_type:
        return model_type
    if is_ctranslate2_whisper(files):
        return "whisper"  # faster-whisper layout: the only CTranslate2 family we serve
    raise ModelLoadFailed(f"{files.path} has no config.json with a model_type", reason="BAD_CONFIG")


def task_of(files: ModelFiles) -> Task:
    if not files.config.get("architectures") and model_type_of(files) == "whisper":
        return Task.AUTOMATIC_SPEECH_RECOGNITION
    return infer_task(files.config)


def with_source_defaults(files: ModelFiles, options: LoadOptions) -> LoadOptions:
    """`options` with the choices left to the source made: `quantization` resolved to one form
    ("none", "int8" or "grouped") and load_in_8bit saying whether it is "int8". A GGUF file whose
    blocks are stored quantized loads "grouped" (its own grids: faster, a third of the memory,
    tokens the float path's on 511/512 teacher-forced steps; README) where its family takes the
    form, pipeserve's native kernels are built and this load can run it; every other source, and
    any load that cannot, loads float weights. A form the request chose that this machine cannot
    run fails here, before any weight is read."""
    try:
        form = chosen_quantization(options.quantization, options.load_in_8bit)
    except ValueError as exc:  # a spec that skipped the manager's checks
        raise ModelLoadFailed(str(exc), reason="INVALID_QUANTIZATION") from None
    if form is None:
        form = "grouped" if _grouped_by_default(files, options) else "none"
    elif form == "grouped":
        _check_grouped(options)
    return dataclasses.replace(options, quantization=form, load_in_8bit=form == "int8")


def _grouped_by_default(files: ModelFiles, options: LoadOptions) -> bool:
    if files.gguf is None or not family_takes(model_type_of(files), "grid_int4"):
        return False
    if not open_gguf(files.gguf).stores_quantized_blocks():
        return False  # float tensors: the grids would be a rounding the file never had
    if not grid_native.available():
        return False  # torch's int4 planes alone decode slower than the float path (README)
    try:
        _check_grouped(options)
    except ModelLoadFailed:
        return False  # another device or dtype: float, as asked
    return True


def _check_grouped(options: LoadOptions) -> None:
    """The grouped form computes on the CPU in float32 around bfloat16 4-bit kernels: the
    device, the CPU (layers/grid_int4's own check) and the dtype, before any weight is read.
    Whether the family takes it is the quantize pass's check (layers/passes.py)."""
    if options.device == "auto":
        raise ModelLoadFailed(f"quantization grouped runs on the CPU; this load asks for device {options.device!r}",
                              reason="QUANTIZATION_UNAVAILABLE")
    why = grid_int4_unavailable(options.torch_device)
    if why:
        raise ModelLoadFailed(f"quantization 'grouped' is not available: {why}", reason="QUANTIZATION_UNAVAILABLE")
    if dtype_name(options.dtype) != "float32":
        raise ModelLoadFailed(f"quantization grouped computes in float32; this load asks for dtype {options.dtype}",
                              reason="QUANTIZATION_UNAVAILABLE")


def load_pipeline(files: ModelFiles, options: LoadOptions, task: Task | str | None = None) -> Pipeline:
    """Builds the pipeline serving `task` (inferred when None) from `files`."""
    options = with_source_defaults(files, options)
    model_type = model_type_of(files)
    inferred = task_of(files)
    wanted = Task.parse(task) if task else inferred
    if wanted is not inferred and not _compatible(wanted, inferred):
        raise WrongTask(f"{files.name} is a {inferred.value} model, not {wanted.value}")
    # The pipeline builds its model through pipelines/base.load_family_model: the one load
    # sequence (checkpoints/loader.py), then the post-load passes (layers/passes.py).
    return pipeline_class(wanted, model_type).from_files(files, options)


# Checkpoints that serve a task other than the one their architecture suggests, as
# transformers.pipeline allows (an NLI classifier used for zero-shot, any encoder for features).
_COMPATIBLE = {
    (Task.ZERO_SHOT_CLASSIFICATION, Task.TEXT_CLASSIFICATION),
    (Task.TEXT_CLASSIFICATION, Task.ZERO_SHOT_CLASSIFICATION),
    (Task.FEATURE_EXTRACTION, Task.TEXT_CLASSIFICATION),
    (Task.FEATURE_EXTRACTION, Task.FILL_MASK),
    (Task.FEATURE_EXTRACTION, Task.TOKEN_CLASSIFICATION),
    (Task.FEATURE_EXTRACTION, Task.QUESTION_ANSWERING),
    (Task.QUESTION_ANSWERING, Task.DOCUMENT_QUESTION_ANSWERING),
}


def _compatible(wanted: Task, inferred: Task) -> bool:
    return (wanted, inferred) in _COMPATIBLE
