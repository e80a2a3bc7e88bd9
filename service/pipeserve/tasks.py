"""The pipeline tasks pipeserve serves, named as transformers.pipeline names them."""
from __future__ import annotations

from enum import Enum


class Task(str, Enum):
    AUTOMATIC_SPEECH_RECOGNITION = "automatic-speech-recognition"
    TEXT_GENERATION = "text-generation"
    IMAGE_CLASSIFICATION = "image-classification"
    ZERO_SHOT_CLASSIFICATION = "zero-shot-classification"
    DOCUMENT_QUESTION_ANSWERING = "document-question-answering"
    TEXT_CLASSIFICATION = "text-classification"
    TOKEN_CLASSIFICATION = "token-classification"
    QUESTION_ANSWERING = "question-answering"
    FILL_MASK = "fill-mask"
    FEATURE_EXTRACTION = "feature-extraction"

    @classmethod
    def parse(cls, name: "str | Task") -> "Task":
        """Accepts 'image-classification', 'image_classification', 'IMAGE_CLASSIFICATION',
        'TASK_IMAGE_CLASSIFICATION' and the pipeline aliases ('asr', 'sentiment-analysis', 'ner')."""
        if isinstance(name, Task):
            return name
        key = name.strip().lower().replace("_", "-")
        key = key.removeprefix("task-")
        key = _ALIASES.get(key, key)
        try:
            return cls(key)
        except ValueError:
            raise ValueError(f"unknown task {name!r}; known: {', '.join(t.value for t in cls)}") from None

    @property
    def proto_name(self) -> str:
        """The pipeserve.v1.Task enum value name."""
        return "TASK_" + self.name


_ALIASES = {
    "asr": "automatic-speech-recognition",
    "sentiment-analysis": "text-classification",
    "ner": "token-classification",
    "embeddings": "feature-extraction",
}
