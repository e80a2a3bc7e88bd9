"""Checkpoint files -> a ready task pipeline. The manager adds residency and budgets on top."""
from __future__ import annotations

import dataclasses

from ..checkpoints.formats import is_ctranslate2_whisper
from ..checkpoints.hub import ModelFiles
from ..checkpoints.registry import infer_task, pipeline_class
from ..errors import ModelLoadFailed, WrongTask
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
    """`options` with the choices left to the source made: a GGUF file on the CPU keeps int8
    weights (already quantized to 4-6 bits, its float32 form is ~8x the file; int8 decoded
    Gemma 3 270M at 10.2 vs 5.6 tokens/s, best of 4 interleaved, on 2 shared cores); every
    other source loads as stored unless load_in_8bit says otherwise."""
    if options.load_in_8bit is not None:
        return options
    quantize = files.gguf is not None and options.torch_device.type == "cpu"
    return dataclasses.replace(options, load_in_8bit=quantize)


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
