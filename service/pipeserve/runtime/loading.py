"""Checkpoint files -> a ready task pipeline. The manager adds residency and budgets on top."""
from __future__ import annotations

import dataclasses

import torch

from ..checkpoints.formats import is_ctranslate2_whisper
from ..checkpoints.hub import ModelFiles
from ..checkpoints.registry import family_module, infer_task, pipeline_class
from ..errors import ModelLoadFailed, WrongTask
from ..layers.weight_only import available as weight_only_available
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
    """`options` with the choices left to the source made. A GGUF file of a family whose int8
    weights keep bfloat16 activations (weight-only, layers/weight_only.py; its `load_model`
    module says WEIGHT_ONLY_INT8) loads with int8 weights on a CPU with that kernel's fast path:
    the file is already 4-6 bits, its float32 form ~8x the file. Measured on Gemma 3 270M:
    resident 0.94 vs 1.91 GB, decoding 1.2-1.5x float32's tokens/s, greedy choices equal to float32's
    on 98.6% of teacher-forced steps (fbgemm's dynamic int8, which quantizes activations to 7
    bits, managed 76%: why it never became the default). Every other source, and
    load_in_8bit=false (the exact float path, transformers' parity), loads as stored."""
    if options.load_in_8bit is not None:
        return options
    return dataclasses.replace(options, load_in_8bit=_int8_by_default(files, options))


def _int8_by_default(files: ModelFiles, options: LoadOptions) -> bool:
    if files.gguf is None or options.torch_device.type != "cpu" or not weight_only_available(torch.ones(1, 1)):
        return False
    try:
        return bool(getattr(family_module(model_type_of(files)), "WEIGHT_ONLY_INT8", False))
    except ModelLoadFailed:
        return False  # an unsupported family fails later, with its own message


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
