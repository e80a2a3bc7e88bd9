"""Which code serves a checkpoint: one table of families keyed by config.json's model_type,
one table of task pipelines, and the architecture rules that infer the task as
transformers.pipeline(model=...) does. Entries are import paths so that nothing heavy is
imported until a model of that family is loaded.
"""
from __future__ import annotations

import importlib
from typing import Any

from ..errors import ModelLoadFailed, TaskNotImplemented
from ..tasks import Task

# config.json model_type -> module with the family's config dataclass, modules and weight table.
FAMILIES: dict[str, str] = {
    "vit": "pipeserve.models.vit",
    "whisper": "pipeserve.models.whisper",
    "wav2vec2": "pipeserve.models.wav2vec2",
    "hubert": "pipeserve.models.wav2vec2",
    "gpt2": "pipeserve.models.gpt2",
    "opt": "pipeserve.models.opt",
    "llama": "pipeserve.models.llama",
    "mistral": "pipeserve.models.llama",
    "qwen2": "pipeserve.models.llama",
    "gemma3_text": "pipeserve.models.gemma3",
    "gemma3": "pipeserve.models.gemma3",  # Gemma3ForConditionalGeneration: its language model
    "bert": "pipeserve.models.bert",
    "roberta": "pipeserve.models.bert",
    "xlm-roberta": "pipeserve.models.bert",
    "distilbert": "pipeserve.models.distilbert",
    "bart": "pipeserve.models.bart",
    "layoutlm": "pipeserve.models.layoutlm",
}

# task -> pipeline class ("module:Class"); a class may serve several families, and a task may
# have one class per family group (keyed "task/model_type" where the family needs its own).
PIPELINES: dict[str, str] = {
    Task.IMAGE_CLASSIFICATION.value: "pipeserve.pipelines.image_classification:ImageClassificationPipeline",
    Task.AUTOMATIC_SPEECH_RECOGNITION.value + "/whisper": "pipeserve.pipelines.whisper.asr:WhisperASRPipeline",
    Task.AUTOMATIC_SPEECH_RECOGNITION.value + "/wav2vec2": "pipeserve.pipelines.ctc.asr:CTCASRPipeline",
    Task.AUTOMATIC_SPEECH_RECOGNITION.value + "/hubert": "pipeserve.pipelines.ctc.asr:CTCASRPipeline",
    Task.TEXT_GENERATION.value: "pipeserve.pipelines.text_generation:TextGenerationPipeline",
    Task.ZERO_SHOT_CLASSIFICATION.value: "pipeserve.pipelines.zero_shot_classification:ZeroShotClassificationPipeline",
    Task.DOCUMENT_QUESTION_ANSWERING.value: "pipeserve.pipelines.document_question_answering:DocumentQuestionAnsweringPipeline",
    Task.TEXT_CLASSIFICATION.value: "pipeserve.pipelines.text_classification:TextClassificationPipeline",
    Task.TOKEN_CLASSIFICATION.value: "pipeserve.pipelines.token_classification:TokenClassificationPipeline",
    Task.QUESTION_ANSWERING.value: "pipeserve.pipelines.question_answering:QuestionAnsweringPipeline",
    Task.FILL_MASK.value: "pipeserve.pipelines.fill_mask:FillMaskPipeline",
    Task.FEATURE_EXTRACTION.value: "pipeserve.pipelines.feature_extraction:FeatureExtractionPipeline",
}

# Architecture-name suffix -> task, checked in order (first match wins).
_ARCHITECTURE_SUFFIXES: list[tuple[str, Task]] = [
    ("ForConditionalGeneration", Task.AUTOMATIC_SPEECH_RECOGNITION),  # whisper; refined below
    ("ForCTC", Task.AUTOMATIC_SPEECH_RECOGNITION),
    ("ForCausalLM", Task.TEXT_GENERATION),
    ("LMHeadModel", Task.TEXT_GENERATION),
    ("ForImageClassification", Task.IMAGE_CLASSIFICATION),
    ("ForSequenceClassification", Task.TEXT_CLASSIFICATION),  # zero-shot when an NLI head
    ("ForTokenClassification", Task.TOKEN_CLASSIFICATION),
    ("ForQuestionAnswering", Task.QUESTION_ANSWERING),  # document QA for layout models
    ("ForMaskedLM", Task.FILL_MASK),
    ("Model", Task.FEATURE_EXTRACTION),
]

_LAYOUT_MODEL_TYPES = {"layoutlm", "layoutlmv2", "layoutlmv3"}

# ForConditionalGeneration checkpoints whose language model we serve for text generation.
_TEXT_CONDITIONAL_MODEL_TYPES = {"gemma3"}


def is_nli_config(config: dict[str, Any]) -> bool:
    """An NLI head has an 'entailment' label, which is how the zero-shot pipeline finds its id."""
    labels = config.get("label2id") or {}
    return any(str(name).lower().startswith("entail") for name in labels)


def infer_task(config: dict[str, Any]) -> Task:
    """The task a checkpoint serves, from config.json's architectures and model_type."""
    model_type = config.get("model_type", "")
    architectures = config.get("architectures") or []
    for architecture in architectures:
        for suffix, task in _ARCHITECTURE_SUFFIXES:
            if not architecture.endswith(suffix):
                continue
            if task is Task.TEXT_CLASSIFICATION and is_nli_config(config):
                return Task.ZERO_SHOT_CLASSIFICATION
            if task is Task.QUESTION_ANSWERING and model_type in _LAYOUT_MODEL_TYPES:
                return Task.DOCUMENT_QUESTION_ANSWERING
            if suffix == "ForConditionalGeneration" and model_type in _TEXT_CONDITIONAL_MODEL_TYPES:
                return Task.TEXT_GENERATION
            if task is Task.AUTOMATIC_SPEECH_RECOGNITION and suffix == "ForConditionalGeneration" and model_type != "whisper":
                continue
            return task
    if model_type == "whisper":
        return Task.AUTOMATIC_SPEECH_RECOGNITION
    raise ModelLoadFailed(
        f"cannot infer the task of model_type={model_type!r} architectures={architectures!r}; "
        "pass the task to LoadModel",
        reason="TASK_UNKNOWN",
    )


def family_module(model_type: str):
    if model_type not in FAMILIES:
        raise ModelLoadFailed(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}",
            reason="UNSUPPORTED_FAMILY",
        )
    return importlib.import_module(FAMILIES[model_type])


def family_takes(model_type: str, what: str) -> bool:
    """A family opted into post-load pass `what` (layers/passes.py `accepts`), asked before its
    model exists: a class the family module itself defines lists it in `post_load`."""
    module = family_module(model_type)
    return any(isinstance(obj, type) and obj.__module__ == module.__name__ and what in getattr(obj, "post_load", ())
               for obj in vars(module).values())


def pipeline_class(task: Task, model_type: str):
    path = PIPELINES.get(f"{task.value}/{model_type}") or PIPELINES.get(task.value)
    if path is None:
        raise TaskNotImplemented(f"no pipeline serves task {task.value!r} for model_type {model_type!r}")
    module_name, _, class_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise TaskNotImplemented(f"task {task.value!r} is not implemented yet in this server") from None
        raise
    return getattr(module, class_name)
