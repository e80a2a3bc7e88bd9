"""Model names as requests spell them -> one canonical name per model, and the checks that run
before a name reaches the filesystem, an error message, a log line or a metric label.

- Bounded: at most MAX_MODEL_NAME_CHARS characters and no control characters (NUL, CR/LF,
  escapes), else INVALID_ARGUMENT; the name itself is not echoed back.
- Canonical: a local directory is named by its real path (so trailing slashes, "./", "//",
  "..", "~" and symlinks all give one entry); "embedded/..." names stay as they are (they
  are looked up in a table, never on disk); anything else is a Hub id, stripped.
- Model root: a local path lies inside the root when its real path does, so a symlink
  inside the root that points out of it is outside.
"""
from __future__ import annotations

import os
import unicodedata

from ..errors import InvalidParameter

# Longer than any real path (PATH_MAX is 4096 bytes, but no checkpoint lives that deep) or Hub
# id (96 characters), short enough to echo or log safely.
MAX_MODEL_NAME_CHARS = 1024
EMBEDDED_PREFIX = "embedded/"


def check_model_name(name: str, field: str = "model") -> None:
    """INVALID_ARGUMENT for names no model can have, before anything else looks at them."""
    if len(name) > MAX_MODEL_NAME_CHARS:
        raise InvalidParameter(f"{field} is {len(name)} characters long; model names have at most "
                               f"{MAX_MODEL_NAME_CHARS}", reason="MODEL_NAME_TOO_LONG")
    for position, char in enumerate(name):
        if unicodedata.category(char) in ("Cc", "Cs"):  # controls (NUL, CR, LF, ESC...), lone surrogates
            raise InvalidParameter(f"{field} holds a control character (U+{ord(char):04X}) at position "
                                   f"{position}; model names are paths or Hub ids", reason="INVALID_MODEL_NAME")


def looks_like_path(name: str) -> bool:
    """Names that can only be local paths: a Hub id is "name" or "owner/name"."""
    return (name.startswith(("/", "./", "../", "~")) or name in (".", "..") or name.count("/") > 1
            or "\\" in name)


def canonical_name(name: str) -> str:
    """The one name a model is kept and listed under (see the module docstring)."""
    name = name.strip()
    if name.startswith(EMBEDDED_PREFIX):
        return name
    if not name:
        return name
    local = os.path.expanduser(name)  # an unknown "~user" stays as it is
    if looks_like_path(name) or os.path.isdir(local) or (local.endswith(".gguf") and os.path.isfile(local)):
        # isdir/isfile: any OSError (too long...) is False
        return os.path.realpath(local)
    return name


def is_local(canonical: str) -> bool:
    """A canonical name of a local path (canonical local names are absolute)."""
    return os.path.isabs(canonical)


def inside_root(canonical: str, root: str) -> bool:
    """Whether a canonical local path lies inside `root` (itself resolved)."""
    real_root = os.path.realpath(root)
    return canonical == real_root or canonical.startswith(real_root.rstrip(os.sep) + os.sep)
