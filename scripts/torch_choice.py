"""Which torch build scripts/setup installs, and from where: prints the `pip install` arguments
one per line on stdout, and on stderr which build it chose and why.

On Linux x86_64 the public index's `torch==X` is the CUDA build, which pulls about twenty
nvidia-* packages (gigabytes) that a machine without a GPU cannot use. So:
  - an NVIDIA GPU (`nvidia-smi -L` lists one): torch==X from the configured index, the CUDA
    build (written torch===X when a local CPU wheel of X is visible, so that pip, which ranks
    X+cpu above X, does not take that one);
  - no GPU, and a CPU wheel of X for this Python in a local wheel folder pip is configured
    with (find-links, or a file:// index; `pip config list` shows both, environment included):
    the plain torch==X, which pip then takes from that folder;
  - no GPU otherwise: torch==X+cpu from PyTorch's CPU index, as an extra index so that the
    rest still resolves from the configured one.

    python scripts/torch_choice.py          (PIP names the pip command, default `pip`)
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.parse import unquote, urlparse

TORCH_VERSION = "2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Keys of `pip config list` whose values name wheel sources ("global.find-links",
# ":env:.extra-index-url", ...); values are whitespace-separated lists.
SOURCE_KEYS = ("find-links", "index-url", "extra-index-url")


def log(message: str) -> None:
    print(f"[setup] torch: {message}", file=sys.stderr)


def gpu_present() -> bool:
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def configured_sources() -> list[str]:
    """Every find-links / index URL pip is configured with (files and environment)."""
    command = shlex.split(os.environ.get("PIP", "pip")) + ["config", "list"]
    try:
        listed = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    sources = []
    for line in listed.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.rsplit(".", 1)[-1] in SOURCE_KEYS:
            sources += value.strip().strip("'\"").split()
    return sources


def local_folder(source: str) -> Path | None:
    """A source that is a folder on this machine (a path or a file:// URL), else None."""
    if "://" in source:
        parsed = urlparse(source)
        return Path(unquote(parsed.path)) if parsed.scheme == "file" else None
    return Path(source)


def local_wheels(source: str) -> list[Path]:
    """The torch X wheels a local source holds: a find-links folder's files, or the files a
    file:// simple index's torch/ page links to."""
    folder = local_folder(source)
    if folder is None or not folder.is_dir():
        return []
    pattern = re.compile(rf"torch-{re.escape(TORCH_VERSION)}(\+[^-]+)?-[^/]*\.whl$")
    found = [p for p in folder.iterdir() if pattern.match(p.name)]
    page = folder / "torch" / "index.html"
    if page.is_file():
        for href in re.findall(r'href="([^"]+)"', page.read_text(errors="replace")):
            target = href.split("#", 1)[0]
            path = local_folder(target) if "://" in target else page.parent / unquote(target)
            if path is not None and pattern.match(path.name) and path.is_file():
                found.append(path.resolve())
    return found


def installable_here(wheel: Path) -> bool:
    """Whether pip on this Python would take the wheel (its tags match this interpreter)."""
    try:
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename
    except ImportError:
        try:
            from pip._vendor.packaging.tags import sys_tags
            from pip._vendor.packaging.utils import parse_wheel_filename
        except ImportError:  # no way to tell: let pip decide
            return True
    try:
        tags = parse_wheel_filename(wheel.name)[3]
    except Exception:
        return False
    return not tags.isdisjoint(set(sys_tags()))


def is_cpu_build(wheel: Path) -> bool:
    """A +cpu local version, or a wheel whose metadata requires no nvidia-* package."""
    if "+cpu" in wheel.name:
        return True
    if "+cu" in wheel.name or "+rocm" in wheel.name:
        return False
    try:
        with zipfile.ZipFile(wheel) as archive:
            metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            text = archive.read(metadata).decode("utf-8", "replace")
    except (OSError, zipfile.BadZipFile, StopIteration):
        return False
    return not re.search(r"^Requires-Dist: nvidia-", text, re.M | re.I)


def local_cpu_wheel() -> Path | None:
    for source in configured_sources():
        for wheel in local_wheels(source):
            if installable_here(wheel) and is_cpu_build(wheel):
                return wheel
    return None


def choose() -> list[str]:
    cpu_wheel = local_cpu_wheel()
    if gpu_present():
        if cpu_wheel is not None:
            log(f"CUDA build torch==={TORCH_VERSION} from the configured index (an NVIDIA GPU is present; "
                f"the local CPU wheel {cpu_wheel} is passed over)")
            return [f"torch==={TORCH_VERSION}"]
        log(f"CUDA build torch=={TORCH_VERSION} from the configured index (an NVIDIA GPU is present)")
        return [f"torch=={TORCH_VERSION}"]
    if cpu_wheel is not None:
        log(f"CPU build torch=={TORCH_VERSION} from the local wheel {cpu_wheel} (no NVIDIA GPU)")
        return [f"torch=={TORCH_VERSION}"]
    log(f"CPU build torch=={TORCH_VERSION}+cpu from {CPU_INDEX} (no NVIDIA GPU, no local CPU wheel; "
        "the public index's torch is the CUDA build)")
    return [f"torch=={TORCH_VERSION}+cpu", "--extra-index-url", CPU_INDEX]


if __name__ == "__main__":
    print("\n".join(choose()))
