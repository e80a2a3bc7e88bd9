"""Model reference -> local files: a local directory, else the Hugging Face cache, else a
download through huggingface_hub (unless offline). Says exactly what it tried when nothing works.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidParameter, ModelLoadFailed, ModelNotFound

# What a pipeline may need from a repository; weights in other formats are not fetched.
_ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.txt",
    "*.model",
    "tokenizer*",
    "model.bin",  # CTranslate2 (faster-whisper) checkpoints
    "vocabulary*",
    "*.jinja",  # chat templates: chat_template.jinja, additional_chat_templates/*.jinja
]
_PICKLE_PATTERNS = ["pytorch_model*.bin"]


@dataclass(frozen=True)
class ModelFiles:
    """A resolved checkpoint: where its files are and its parsed config.json (may be empty for
    formats without one, e.g. CTranslate2 Whisper). A GGUF checkpoint names its file in `gguf`;
    its config is built from the file's metadata, and its tokenizer files are too: the file is
    the whole checkpoint, whatever lies beside it."""

    name: str
    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    revision: str | None = None
    gguf: Path | None = None

    def read_json(self, filename: str) -> dict[str, Any] | None:
        if self.gguf is not None:
            return self._gguf_json(filename)
        path = self.path / filename
        if not path.is_file():
            return None
        return json.loads(path.read_text(encoding="utf-8"))

    def has(self, filename: str) -> bool:
        if self.gguf is not None and filename in _GGUF_PROVIDES:
            return True
        return (self.path / filename).exists()

    def tokenizer_json(self) -> str | None:
        """The tokenizer.json text: the file, or the one a GGUF file's metadata describes."""
        if self.gguf is not None:
            from . import gguf_tokenizer
            from .gguf_cache import cached_text

            # built once per file version, then read back from the cache (seconds -> milliseconds)
            return cached_text(self.gguf, "tokenizer.json", Path(gguf_tokenizer.__file__),
                               lambda: json.dumps(self._gguf_json("tokenizer.json"), ensure_ascii=False))
        path = self.path / "tokenizer.json"
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def _gguf_json(self, filename: str) -> dict[str, Any] | None:
        from .gguf import open_gguf
        from .gguf_tokenizer import tokenizer_config, tokenizer_json

        assert self.gguf is not None
        if filename == "tokenizer.json":
            return tokenizer_json(open_gguf(self.gguf))
        if filename == "tokenizer_config.json":
            return tokenizer_config(open_gguf(self.gguf))
        if filename == "config.json":
            return dict(self.config)
        return None


# The files a GGUF checkpoint's metadata stands in for.
_GGUF_PROVIDES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def _is_offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / "config.json"
    if not config_path.is_file():
        return {}
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadFailed(f"{config_path} is not valid JSON: {exc}", reason="BAD_CONFIG") from None


def resolve(reference: str, revision: str | None = None, *, offline: bool | None = None,
            allow_pickle: bool = False) -> ModelFiles:
    """Finds the files of `reference` (a directory or a Hub repo id)."""
    reference = reference.strip()
    if not reference:
        raise InvalidParameter("model reference is empty")
    attempts: list[str] = []
    if reference.startswith("embedded/"):
        from .embedded import NAMES, resolve_name

        path = resolve_name(reference)
        if path is None:
            raise ModelNotFound(f"embedded model {reference!r} is not installed; known: {sorted(NAMES)} "
                                "(scripts/setup installs them)")
        return _local_files(reference, path, revision)
    local = Path(reference).expanduser()
    if local.is_file() and local.suffix == ".gguf":
        return _gguf_files(reference, local.resolve(), revision)
    if local.is_dir():
        return _local_files(reference, local, revision)
    attempts.append(f"local directory {local} does not exist")
    if reference.startswith(("/", "./", "../", "~")) or reference.count("/") > 1:
        raise ModelNotFound(f"model {reference!r} not found: " + "; ".join(attempts))

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    patterns = _ALLOW_PATTERNS + (_PICKLE_PATTERNS if allow_pickle else [])
    modes = [True] if _is_offline(offline) else [True, False]
    for local_only in modes:
        where = "Hugging Face cache" if local_only else "Hugging Face Hub download"
        try:
            path = Path(snapshot_download(reference, revision=revision, allow_patterns=patterns,
                                          local_files_only=local_only))
        except HFValidationError as exc:
            raise InvalidParameter(f"{reference!r} is neither a directory nor a valid Hub id: {exc}") from None
        except Exception as exc:  # huggingface_hub raises many kinds; each is one failed attempt
            attempts.append(_attempt(where, revision, exc))
            continue
        return ModelFiles(reference, path, _read_config(path), revision)
    if len(modes) == 1:
        attempts.append("Hub download skipped: the server is offline (its hub_offline setting or HF_HUB_OFFLINE); "
                        "an operator can set hub_offline=false on a server that reaches the Hub, or put the "
                        "model in the cache above (HF_HOME / HF_HUB_CACHE choose where it is)")
    raise ModelNotFound(f"model {reference!r} not found: " + "; ".join(attempts))


def _local_files(reference: str, directory: Path, revision: str | None) -> ModelFiles:
    """A directory: a transformers or CTranslate2 layout, or (no config.json) one GGUF file."""
    if not (directory / "config.json").is_file():
        from .gguf import find_gguf

        found = find_gguf(directory)
        if found is not None:
            return _gguf_files(reference, found.resolve(), revision)
    return ModelFiles(reference, directory.resolve(), _read_config(directory), revision)


def _gguf_files(reference: str, path: Path, revision: str | None) -> ModelFiles:
    from .gguf import open_gguf
    from .gguf_families import gguf_config

    return ModelFiles(reference, path.parent, gguf_config(open_gguf(path)), revision, gguf=path)


def _attempt(where: str, revision: str | None, exc: Exception) -> str:
    """One failed Hub attempt in the server's words: huggingface_hub's own messages advise
    Python arguments (local_files_only=False) that a gRPC caller cannot pass."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(exc, LocalEntryNotFoundError):
        return f"not in the server's Hugging Face cache {constants.HF_HUB_CACHE} (revision {revision or 'main'})"
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{where} (revision {revision or 'main'}): {type(exc).__name__}: {first_line}".strip()
