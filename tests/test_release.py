"""Release hygiene (issue 17, item 8): one version, shown the same everywhere; a LICENSE that is
the licence pyproject declares; upper bounds on the server's run-time dependencies; every
transformers version the tests use written in one place."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
VERSION_FILE = ROOT / "clients" / "python" / "pipeserve_client" / "_version.py"
PYPROJECTS = (ROOT / "pyproject.toml", ROOT / "clients" / "python" / "pyproject.toml")


def _written_version() -> str:
    match = re.fullmatch(r'(?s).*^__version__ = "([^"]+)"$.*', VERSION_FILE.read_text(), re.M)
    assert match, f"{VERSION_FILE} writes no __version__"
    return match.group(1)


def _shown(module: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "service"), str(ROOT / "clients" / "python")])}
    done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_version_is_written_once_and_shown_the_same_everywhere():
    import pipeserve
    import pipeserve_client

    version = _written_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc)?\d*", version), version
    assert pipeserve.__version__ == pipeserve_client.__version__ == version
    assert _shown("pipeserve.server") == f"pipeserve {version}"  # pipeserve-server --version
    assert _shown("pipeserve_client.cli") == f"pipeserve {version}"  # pipeserve --version
    # Both distributions read it at build time: neither pyproject writes a version of its own.
    for pyproject in PYPROJECTS:
        project = tomllib.loads(pyproject.read_text())["project"]
        assert "version" not in project and "version" in project["dynamic"], pyproject
    client = tomllib.loads(PYPROJECTS[1].read_text())["tool"]["setuptools"]["dynamic"]["version"]
    assert client == {"attr": "pipeserve_client._version.__version__"}
    # The latest release in the changelog is this version.
    releases = re.findall(r"^## \[?(\d+\.\d+\.\d+\S*?)\]?(?: |$)", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert releases and releases[0] == version, releases


def test_license_file_is_the_license_pyproject_declares():
    text = (ROOT / "LICENSE").read_text()
    for pyproject in PYPROJECTS:
        project = tomllib.loads(pyproject.read_text())["project"]
        assert project["license"] == "Apache-2.0", pyproject
        assert project["license-files"] == ["LICENSE"], pyproject
        shipped = pyproject.parent / "LICENSE"
        assert shipped.read_text() == text, shipped  # the client's is a link to the same file
    # The full Apache License 2.0: title, version line, all nine sections, the end marker.
    assert re.match(r"\s*Apache License\s+Version 2\.0, January 2004\s+http://www\.apache\.org/licenses/", text)
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    headings = re.findall(r"^\s+(\d)\. (Definitions|Grant of Copyright License|Grant of Patent License|"
                          r"Redistribution|Submission of Contributions|Trademarks|Disclaimer of Warranty|"
                          r"Limitation of Liability|Accepting Warranty or Additional Liability)\.", text, re.M)
    assert [int(n) for n, _ in headings] == list(range(1, 10)), headings
    assert "END OF TERMS AND CONDITIONS" in text


def test_server_runtime_dependencies_have_upper_bounds():
    import server_requirements

    requirements = [Requirement(r) for r in server_requirements.runtime()]
    names = {r.name.lower().replace("_", "-") for r in requirements}
    assert {"torch", "grpcio", "protobuf", "huggingface-hub", "safetensors", "tokenizers"} <= names
    unbounded = [str(r) for r in requirements
                 if not any(s.operator in ("<", "<=", "==", "===", "~=") for s in r.specifier)]
    assert not unbounded, f"run-time dependencies without an upper bound: {unbounded}"
    # The bounds admit what this environment runs the tests with.
    from importlib import metadata

    for requirement in requirements:
        installed = metadata.version(requirement.name)
        assert requirement.specifier.contains(installed, prereleases=True), (str(requirement), installed)


def test_transformers_versions_are_written_in_one_place_each():
    """The test extra's transformers (pyproject) and the question-answering oracle's
    (tests/qa-oracle.txt); no script, test or benchmark names a transformers version itself."""
    pattern = re.compile(r"\btransformers\s*(===|==|>=|<=|~=|!=|<|>)\s*\d")
    files = [ROOT / "pyproject.toml", ROOT / "setup.py", *ROOT.glob("scripts/*"), *ROOT.glob(".ci/*"),
             *ROOT.glob("tests/**/*.py"), *ROOT.glob("tests/*.txt"), *ROOT.glob("bench/**/*.py"),
             *ROOT.glob("bench/**/*.txt"), *ROOT.glob("deploy/**/Dockerfile*"), *ROOT.glob("clients/python/*.toml")]
    found = {}
    for path in files:
        if path.is_file() and path != Path(__file__).resolve():
            hits = pattern.findall(path.read_text(errors="replace"))
            if hits:
                found[str(path.relative_to(ROOT))] = len(hits)
    assert found == {"pyproject.toml": 1, "tests/qa-oracle.txt": 1}, found
    test_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    transformers = [Requirement(r) for r in test_extra if Requirement(r).name == "transformers"]
    from importlib import metadata

    assert len(transformers) == 1 and transformers[0].specifier.contains(metadata.version("transformers"))

    sys.path.insert(0, str(ROOT / "tests"))
    import qa_oracle

    assert qa_oracle.pinned_version().startswith("4.")


def test_the_test_extra_holds_every_build_requirement():
    """tests/test_client_wheel.py builds both wheels without build isolation (offline), so the
    environment scripts/setup --test makes must hold what both builds require."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    test_extra = {Requirement(r).name.lower(): Requirement(r)
                  for r in pyproject["project"]["optional-dependencies"]["test"]}
    for path in PYPROJECTS:
        for required in map(Requirement, tomllib.loads(path.read_text())["build-system"]["requires"]):
            assert required.name.lower() in test_extra, (path, str(required))
            assert test_extra[required.name.lower()].specifier == required.specifier, (path, str(required))
