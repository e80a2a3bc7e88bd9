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
    """`options` with the choices left to the source made. Every source, GGUF included, loads
    with float weights unless load_in_8bit says otherwise. Measured on Gemma 3 270M (GGUF):
    int8 decoded 10.2 vs float32's 5.6 tokens/s (best of 4 interleaved, 2 shared cores) in
    0.94 vs 2.08 GB, but the CPU int8 kernel quantizes activations too (fbgemm, 7-bit), and on
    Gemma's large activations that moved the greedy choice on 24-42% of steps (max logit error
    0.45 of the largest logit); weight-only int8 kept 92% (0.05) but ran 3-6x slower than
    float32. So int8 stays an option until a fast weight-only CPU kernel exists."""
    if options.load_in_8bit is not None:
        return options
    return dataclasses.replace(options, load_in_8bit=False)


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
