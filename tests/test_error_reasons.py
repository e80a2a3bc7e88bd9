"""One vocabulary of error reasons: every ErrorInfo reason the server can raise is listed in
common.proto's error documentation, so a client can rely on that list. The reasons are
collected from the code (`reason="..."` arguments and `reason = "..."` class attributes), so
a new reason fails this test until it is documented."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVICE = ROOT / "service" / "pipeserve"
COMMON_PROTO = ROOT / "protos" / "pipeserve" / "v1" / "common.proto"

# reason="X", reason = "X" (class attributes), reason: str = "X", and the `or "X"` fallback
# of a reason computed at run time.
_RAISED = re.compile(r"""\breason\s*(?::\s*str\s*)?=\s*(?:[\w.]+\s+or\s+)?["']([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*)["']""")


def raised_reasons() -> dict[str, set[str]]:
    """{reason: {files raising it}} over the server's code (generated stubs excluded)."""
    found: dict[str, set[str]] = {}
    for path in SERVICE.rglob("*.py"):
        if path.parent.name == "v1":
            continue
        for match in _RAISED.finditer(path.read_text(encoding="utf-8")):
            found.setdefault(match.group(1), set()).add(str(path.relative_to(ROOT)))
    return found


def documented_reasons() -> set[str]:
    comments = "\n".join(line.split("//", 1)[1] for line in COMMON_PROTO.read_text().splitlines() if "//" in line)
    return set(re.findall(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b|\b[A-Z]{4,}\b", comments))


def test_every_raised_reason_is_documented_in_common_proto():
    raised = raised_reasons()
    # The collector sees the reasons of the error classes and of the decoders, not nothing.
    assert {"INVALID_INPUT", "QUEUE_FULL", "MODEL_NOT_FOUND", "EMPTY_INPUT", "CORRUPT_IMAGE"} <= set(raised)
    missing = {reason: sorted(files) for reason, files in raised.items() if reason not in documented_reasons()}
    assert not missing, f"reasons raised but not listed in {COMMON_PROTO.name}: {missing}"


def test_one_reason_for_an_empty_input():
    """An empty question is EMPTY_INPUT in question answering and document QA alike."""
    assert "EMPTY_QUESTION" not in raised_reasons()
    assert "EMPTY_QUESTION" not in documented_reasons()
