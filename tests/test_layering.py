"""The architecture as a test: every import in service/pipeserve, read from the AST (module
level, inside functions and under TYPE_CHECKING alike), must go down the layer table below, no
two modules may import each other through any chain, and a module over MAX_LINES lines says why
in its docstring. Each package's docstring states its row of the table ("May import: ..."), and
this test holds the two together.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parents[1] / "service"
PACKAGE = SERVICE / "pipeserve"

# Layers, lowest first. A layer may import itself and what its row names; nothing above it.
# "core" is the top-level modules every layer shares (errors, tasks, bounds, settings, the
# device and caller vocabulary); "contracts" the generated protobuf code (pipeserve.v1);
# "entry" the composition root, pipeserve.server, which wires everything together.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "checkpoints": {"core"},
    # native operators (C++ built at setup) and their build/load; the cache directory is checkpoints'
    "kernels": {"core", "checkpoints"},
    "inputs": {"core", "checkpoints"},
    "layers": {"core", "checkpoints", "kernels"},
    "scheduling": {"core", "checkpoints", "layers"},
    "models": {"core", "checkpoints", "layers"},
    "pipelines": {"core", "checkpoints", "inputs", "layers", "scheduling", "models"},
    "runtime": {"core", "checkpoints", "layers", "scheduling", "pipelines"},
    "api": {"core", "contracts", "checkpoints", "inputs", "scheduling", "runtime", "pipelines"},
    "serving": {"core", "contracts", "checkpoints", "runtime", "api"},
    # The HTTP front door speaks to the gRPC services over a loopback channel: contracts only.
    "http": {"core", "contracts"},
    "entry": {"core", "contracts", "checkpoints", "kernels", "inputs", "layers", "scheduling", "models", "pipelines",
              "runtime", "api", "serving", "http"},
}
PACKAGES = [name for name in ALLOWED if name not in ("core", "entry")]

# Speed passes are applied to models from outside (runtime/loading.py runs them); a model file
# may use the building blocks in layers/ (Conv1D, the KV cache, the packed linear's fused
# activation) but not the passes themselves.
PASSES = {"pipeserve.layers.quantization", "pipeserve.layers.device_map", "pipeserve.layers.verified_head",
          "pipeserve.layers.head_layout", "pipeserve.layers.passes", "pipeserve.layers.grid_int4"}

# (importer, imported) -> why the rule above does not hold there yet.
EXCEPTIONS: dict[tuple[str, str], str] = {}

MAX_LINES = 450
# A module longer than MAX_LINES carries this phrase and its reason in its docstring.
LONG_MODULE_MARK = re.compile(r"Longer than 450 lines: \S")


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # the module the statement loads (a submodule when `from pkg import submodule`)
    line: int


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SERVICE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "v1" not in p.relative_to(PACKAGE).parts}


SOURCES = _sources()


def _is_package(module: str) -> bool:
    return SOURCES.get(module, Path()).name == "__init__.py"


def _imports(module: str, path: Path) -> list[Import]:
    package = module if _is_package(module) else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [Import(module, a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "pipeserve"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "pipeserve":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append(Import(module, sub if sub in SOURCES or sub.startswith("pipeserve.v1") else target,
                                    node.lineno))
    return found


IMPORTS = [imp for module, path in SOURCES.items() for imp in _imports(module, path)]


def layer_of(module: str) -> str:
    parts = module.split(".")
    if module == "pipeserve.server":
        return "entry"
    if len(parts) > 1 and parts[1] == "v1":
        return "contracts"
    if len(parts) > 1 and parts[1] in ALLOWED and (len(parts) > 2 or _is_package(module)):
        return parts[1]
    return "core"  # pipeserve itself and its top-level modules


def test_every_import_resolves_to_a_module():
    missing = [f"{i.importer}:{i.line} imports {i.target}" for i in IMPORTS
               if i.target not in SOURCES and not i.target.startswith("pipeserve.v1")]
    assert not missing, missing


def test_every_module_has_a_layer():
    # A new top-level package must get a row in ALLOWED rather than fall into core by accident.
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists() and p.name != "v1"}
    assert packages == set(PACKAGES), packages ^ set(PACKAGES)


def upward_imports(imports: list[Import]) -> list[str]:
    upward = []
    for imp in imports:
        source, target = layer_of(imp.importer), layer_of(imp.target)
        if source != target and target not in ALLOWED[source] and (imp.importer, imp.target) not in EXCEPTIONS:
            upward.append(f"{imp.importer}:{imp.line} ({source}) imports {imp.target} ({target})")
    return upward


def test_imports_only_go_down():
    assert not upward_imports(IMPORTS), "\n".join(upward_imports(IMPORTS))


def test_models_do_not_apply_speed_passes():
    inside = [f"{i.importer}:{i.line} imports {i.target}" for i in IMPORTS
              if layer_of(i.importer) == "models" and i.target in PASSES and (i.importer, i.target) not in EXCEPTIONS]
    assert not inside, inside


def test_exceptions_are_still_needed():
    present = {(i.importer, i.target) for i in IMPORTS}
    stale = [pair for pair in EXCEPTIONS if pair not in present]
    assert not stale, f"remove these EXCEPTIONS, the imports are gone: {stale}"


def test_servicers_hold_no_torch():
    torch_users = []
    for module, path in SOURCES.items():
        if layer_of(module) != "api":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            torch_users += [f"{module}:{node.lineno}" for n in names if n.split(".")[0] in ("torch", "numpy")]
    assert not torch_users, torch_users


def cycles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected components of the module graph with more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {m: set() for m in {i.importer for i in imports} | set(SOURCES)}
    for imp in imports:
        if imp.target in graph and imp.target != imp.importer:
            graph[imp.importer].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return components


def test_no_import_cycles():
    assert not cycles(IMPORTS), cycles(IMPORTS)


def test_long_modules_say_why():
    unexplained = []
    for module, path in SOURCES.items():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        if lines > MAX_LINES and not LONG_MODULE_MARK.search(doc):
            unexplained.append(f"{module}: {lines} lines")
    assert not unexplained, unexplained


@pytest.mark.parametrize("package", PACKAGES)
def test_package_docstring_states_its_row(package):
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text(encoding="utf-8"))) or ""
    match = re.search(r"May import: ([^.]*)\.", doc)
    assert match, f"pipeserve.{package}'s docstring lacks its 'May import: ...' line"
    stated = {name.strip() for name in match.group(1).split(",") if name.strip() and name.strip() != "nothing else"}
    assert stated == ALLOWED[package], (stated, ALLOWED[package])


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path):
    """The rules above catch what they claim to: a model importing a pipeline, and two modules
    importing each other (one of them only inside a function)."""
    fake = {
        "pipeserve.models.fake": "from ..pipelines.base import Pipeline\n",
        "pipeserve.inputs.a": "def f():\n    from .b import g\n",
        "pipeserve.inputs.b": "from .a import f\n",
    }
    extra = []
    for module, text in fake.items():
        path = tmp_path / (module.replace(".", "_") + ".py")
        path.write_text(text)
        extra += _imports(module, path)
    assert upward_imports(extra) == ["pipeserve.models.fake:1 (models) imports pipeserve.pipelines.base (pipelines)"]
    assert cycles(extra) == [["pipeserve.inputs.a", "pipeserve.inputs.b"]]
