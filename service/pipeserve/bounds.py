"""Bounds for user strings on their way into errors, logs and metric labels.

A client controls model names, request ids and every string it sends; echoed unbounded, one
100 kB name made an error trailer too large for grpc (the client saw RESOURCE_EXHAUSTED with
no reason) and wrote 200 kB to the log. Every path shortens through here; validators that
refuse long values outright (model names, request ids) come first where they exist."""
from __future__ import annotations

import hashlib
import re

# An error's message, in UTF-8 bytes. grpc sends it twice in the trailers (grpc-message,
# percent-encoded: up to 3 bytes per byte, and inside grpc-status-details-bin, base64), and
# clients refuse trailers over 8 KiB by default: 1 KiB leaves room for ErrorInfo.
MAX_ERROR_MESSAGE_BYTES = 1024
# Each ErrorInfo metadata value, in UTF-8 bytes, and all of them together.
MAX_METADATA_VALUE_BYTES = 256
MAX_METADATA_BYTES = 1024
# A request id: a UUID is 32-36 characters, a W3C trace id 32; 128 leaves room for prefixes.
MAX_REQUEST_ID_CHARS = 128
# A user string quoted in a log line, and a whole log message.
MAX_LOG_VALUE_CHARS = 200
MAX_LOG_MESSAGE_CHARS = 1024
# A model name used as a metric label.
MAX_LABEL_CHARS = 128

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def shorten(text: str, limit: int) -> str:
    """`text` if it has at most `limit` characters, else its start and a marker saying how
    much was cut: "abc…(+99997 chars)"."""
    if len(text) <= limit:
        return text
    longest_marker = f"…(+{len(text)} chars)"  # the count below never has more digits
    keep = max(0, limit - len(longest_marker))
    return text[:keep] + f"…(+{len(text) - keep} chars)"


def shorten_utf8(text: str, limit_bytes: int) -> str:
    """`text` cut (at a character boundary, with the marker) so its UTF-8 form fits `limit_bytes`."""
    if len(text.encode("utf-8", "surrogatepass")) <= limit_bytes:
        return text
    limit = limit_bytes
    while limit > 0:
        short = shorten(text, limit)
        if len(short.encode("utf-8", "surrogatepass")) <= limit_bytes:
            return short
        limit = limit * 3 // 4
    return ""


def for_log(value: str, limit: int = MAX_LOG_VALUE_CHARS) -> str:
    """A user string as a log line may quote it: control characters escaped (no forged lines
    or terminal escapes), then bounded."""
    escaped = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", value)
    return shorten(escaped, limit)


def request_id_problem(rid: str) -> str | None:
    """Why `rid` cannot be a request id (too long, control characters), or None."""
    if len(rid) > MAX_REQUEST_ID_CHARS:
        return f"the request id has {len(rid)} characters; the limit is {MAX_REQUEST_ID_CHARS}"
    if _CONTROL.search(rid):
        return "the request id contains control characters"
    return None


def metric_label(name: str) -> str:
    """A model name as a metric label: names over the bound keep their start and a digest, so
    two long names stay two labels and the page stays small."""
    if len(name) <= MAX_LABEL_CHARS:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{name[:MAX_LABEL_CHARS - 14]}…{digest}"
