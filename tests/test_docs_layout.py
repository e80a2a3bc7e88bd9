"""The docs describe the tree as it is: ARCHITECTURE.md's layer table and the README's Layout
block name every package and top-level module of service/pipeserve, and every module path the
two documents name exists. A package added without a row, or a module renamed under a
paragraph that still points at the old name, fails here instead of misleading a newcomer.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "service" / "pipeserve"
ARCHITECTURE = ROOT / "ARCHITECTURE.md"
README = ROOT / "README.md"

# Module paths as the documents write them: `layers/passes.py`, `pipelines/whisper/asr.py`, or a
# dotted reference into a module such as `checkpoints/loader.load_module`.
MODULE_PATH = re.compile(r"(?<![\w./-])((?:[a-z_0-9]+/)+)([a-z_0-9]+)(?:\.py\b|\.[A-Za-z_]+)")
# Package references: `runtime/`, `pipelines/whisper/` (a folder under service/pipeserve).
PACKAGE_PATH = re.compile(r"(?<![\w./-])((?:[a-z_0-9]+/)+)(?![\w.])")


def _top_level_packages() -> list[str]:
    return sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py") if p.parent.name != "v1")


def _top_level_modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def _layer_table() -> str:
    """The rows of ARCHITECTURE.md's 'Layers, lowest first' table."""
    text = ARCHITECTURE.read_text()
    section = text.split("## Layers, lowest first", 1)[1].split("\n## ", 1)[0]
    return "\n".join(line for line in section.splitlines() if line.startswith("|"))


def _readme_layout() -> str:
    """The code block under the README's '## Layout' heading."""
    section = README.read_text().split("\n## Layout\n", 1)[1]
    return section.split("```", 2)[1]


def _names_in(text: str) -> set[str]:
    return set(re.findall(r"[a-z_0-9]+", text))


@pytest.mark.parametrize("document", ["ARCHITECTURE.md layer table", "README Layout"])
def test_every_package_and_top_level_module_is_named(document):
    text = _layer_table() if document.startswith("ARCHITECTURE") else _readme_layout()
    named_packages = {m.group(1).strip("/") for m in PACKAGE_PATH.finditer(text)} | set(
        re.findall(r"`([a-z_0-9]+)/`", text))
    missing_packages = [p for p in _top_level_packages() if p not in named_packages]
    words = _names_in(text)
    missing_modules = [m for m in _top_level_modules() if m not in words]
    assert not missing_packages and not missing_modules, (
        f"{document} does not name packages {missing_packages} or modules {missing_modules}")


def _referenced_modules(text: str) -> set[str]:
    """Module paths relative to service/pipeserve named in `text` (paths outside it skipped)."""
    found = set()
    for match in MODULE_PATH.finditer(text):
        folders, stem = match.group(1), match.group(2)
        if folders.split("/")[0] in {"protos", "clients", "tests", "bench", "deploy", "scripts", "service"}:
            continue
        found.add(folders + stem)
    return found


def _exists(relative: str) -> bool:
    target = PACKAGE / relative
    return target.with_suffix(".py").is_file() or (target / "__init__.py").is_file()


def _package_exists(relative: str) -> bool:
    """`runtime/` from the root, or a sub-package written short in its parent's row (`whisper/`
    in the pipelines row)."""
    return any(PACKAGE.glob(f"**/{relative}/__init__.py"))


@pytest.mark.parametrize("document", [ARCHITECTURE, README], ids=lambda p: p.name)
def test_every_named_module_and_package_exists(document):
    text = document.read_text()
    if document == README:
        text = _readme_layout()
    modules = _referenced_modules(text)
    packages = {m.group(1).strip("/") for m in PACKAGE_PATH.finditer(text)}
    packages = {p for p in packages if p.split("/")[0] not in
                {"protos", "clients", "tests", "bench", "deploy", "scripts", "service"}}
    if document == ARCHITECTURE:
        assert modules, "the module-path pattern found nothing: the document's format changed"
    missing = sorted(m for m in modules if not _exists(m)) + sorted(
        p + "/" for p in packages if not _package_exists(p))
    assert not missing, f"{document.name} names what does not exist under service/pipeserve: {missing}"


def test_the_checks_see_a_missing_and_a_stale_name():
    assert not _exists("layers/no_such_module")
    assert _package_exists("whisper") and not _package_exists("no_such_package")
    assert _referenced_modules("see `layers/old_name.py` and checkpoints/loader.load_module") == {
        "layers/old_name", "checkpoints/loader"}
    assert {m.group(1) for m in PACKAGE_PATH.finditer("`runtime/` and pipelines/whisper/ here")} == {
        "runtime/", "pipelines/whisper/"}
