"""A disk cache of what is slow to derive from a GGUF file: the tokenizer.json text its
metadata describes (rebuilding a 262k-token vocabulary's merges takes seconds; reading the
cached text back takes milliseconds).

One file per (GGUF file, builder) pair, named by a digest of the file's resolved path, size
and modification time and of the builder's own source, so that a changed file or a changed
builder never reads a stale entry. The folder is $PIPESERVE_CACHE_DIR, else
$XDG_CACHE_HOME/pipeserve, else ~/.cache/pipeserve. Writes are atomic (a temporary file,
then a rename); a folder that cannot be written only costs the rebuild.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    explicit = os.environ.get("PIPESERVE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pipeserve"


def _entry(path: Path, kind: str, builder_source: Path) -> Path:
    stat = path.stat()
    digest = hashlib.sha256()
    for part in (str(path.resolve()), str(stat.st_size), str(stat.st_mtime_ns), kind):
        digest.update(part.encode() + b"\0")
    digest.update(builder_source.read_bytes())
    return cache_dir() / "gguf" / f"{digest.hexdigest()[:32]}.{kind}"


def cached_text(path: Path, kind: str, builder_source: Path, build: Callable[[], str]) -> str:
    """The text `build()` derives from the GGUF file `path`, from the cache when it holds it.
    `builder_source` is the module that builds it: editing it invalidates its entries."""
    try:
        entry = _entry(path, kind, builder_source)
        return entry.read_text(encoding="utf-8")
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("GGUF cache unreadable (%s); rebuilding", exc)
        entry = None
    text = build()
    if entry is not None:
        _store(entry, text)
    return text


def _store(entry: Path, text: str) -> None:
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=entry.parent, prefix=".partial-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(temporary, entry)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as exc:
        log.info("GGUF cache not written (%s): the next load rebuilds", exc)
