"""Which torch devices exist on this machine, and whether a requested device name is one of
them: "cpu"; "cuda" (the current GPU) and "cuda:N" for N below the visible GPU count; "mps"
where Apple's Metal backend is available; "auto" (text generation spreads layers over the GPUs,
then CPU; other pipelines use the first GPU, else the CPU), which always exists.

Checked when settings load (a one-line configuration error) and when LoadModel names a
device (INVALID_ARGUMENT / DEVICE_NOT_AVAILABLE), so torch's own failure for a device that is
not there (an AssertionError from deep in its CUDA initialisation) never reaches a user."""
from __future__ import annotations

import re

from .errors import InvalidParameter

_NAME = re.compile(r"(cpu|cuda|mps|auto)(?::(\d{1,4}))?")


class DeviceNotAvailable(InvalidParameter):
    reason = "DEVICE_NOT_AVAILABLE"


def available_devices() -> list[str]:
    """The device names that work here, most specific first after the CPU."""
    import torch

    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names + ["auto"]


def device_problem(name: str) -> str | None:
    """Why `name` cannot be used here (listing what can), or None when it can."""
    match = _NAME.fullmatch(name)
    if match and match.group(1) == "cpu" and match.group(2) in (None, "0"):
        return None  # the common case needs no torch import
    if match and match.group(1) == "auto" and match.group(2) is None:
        return None
    if match is None or match.group(1) in ("auto", "cpu"):
        known = "cpu, cuda, cuda:N, mps or auto"
        return f"is not a device name (use {known}); devices here: {', '.join(available_devices())}"
    available = available_devices()
    kind, index = match.group(1), match.group(2)
    wanted = "cuda:0" if (kind, index) == ("cuda", None) else name
    if kind == "mps" and index in (None, "0"):
        wanted = "mps"
    if wanted in available:
        return None
    return f"is not available on this machine; devices here: {', '.join(available)}"


def require_device(name: str) -> None:
    """Raises DeviceNotAvailable (INVALID_ARGUMENT) when `name` cannot be used here."""
    problem = device_problem(name)
    if problem:
        raise DeviceNotAvailable(f"device {name[:40]!r} {problem}", metadata={"field": "device"})
