"""Writes the sync and asyncio method modules (_client_methods.py, _aio_methods.py) from the
one description in _methods.py, so both clients have the same methods with real signatures,
docstrings and return types that help() and type checkers read like hand-written code.

    python -m pipeserve_client._codegen          # rewrite both files
    python -m pipeserve_client._codegen --check  # exit 1 when either is out of date

A method's parameters are its describe function's; its return type is the RPC's response
message from the proto descriptors (Iterator / AsyncIterator for streams) or the unpacker's
return type; a batch parameter also takes a list (one overload per way of giving lists, each
returning a list of results). Names the annotations use are imported as _methods.py imports
them."""
from __future__ import annotations

import ast
import builtins
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path

from . import _methods
from ._methods import Kind, MethodSpec
from ._services import service_descriptor

WIDTH = 118
PACKAGE_DIR = Path(__file__).parent


@dataclass(frozen=True)
class Flavour:
    """What differs between the two generated modules."""

    filename: str
    is_async: bool
    docstring: str
    base: str  # the call machinery class in _calls.py
    methods_class: str
    models_class: str
    models_doc: str
    iterator: str  # Iterator or AsyncIterator


SYNC = Flavour(
    filename="_client_methods.py", is_async=False,
    docstring="Client's methods: one per entry of _methods.METHODS, each building its request with the "
              "entry's\ndescribe function and calling through SyncCalls (retries and deadlines in _calls.py).",
    base="SyncCalls", methods_class="ClientMethods", models_class="Models",
    models_doc="ModelService: client.models.list() / get(name) / load(path_or_hub_id, ...) / unload(name).",
    iterator="Iterator")
ASYNC = Flavour(
    filename="_aio_methods.py", is_async=True,
    docstring="AsyncClient's methods: one per entry of _methods.METHODS, as coroutines (unary) and async\n"
              "iterators (streams), calling through AsyncCalls (retries and deadlines in _calls.py).",
    base="AsyncCalls", methods_class="AsyncClientMethods", models_class="AsyncModels",
    models_doc="ModelService: await client.models.list() / get(name) / load(path_or_hub_id, ...) / unload(name).",
    iterator="AsyncIterator")
FLAVOURS = (SYNC, ASYNC)


# --- names and imports --------------------------------------------------------------------

class Imports:
    """The import statements a generated module needs: its own, plus those _methods.py uses
    for the names its annotations mention."""

    def __init__(self) -> None:
        self.described = _import_table(Path(_methods.__file__).read_text())
        self.lines: dict[tuple[int, str], set[str]] = {}

    def add(self, module: str, name: str, level: int = 0) -> None:
        self.lines.setdefault((level, module), set()).add(name)

    def mention(self, annotation: str) -> None:
        """Imports every free name in an annotation written in _methods.py."""
        for node in ast.walk(ast.parse(annotation, mode="eval")):
            if not isinstance(node, ast.Name) or hasattr(builtins, node.id):
                continue
            if node.id in self.described:
                level, module, imported = self.described[node.id]
                self.add(module, imported if imported == node.id else f"{imported} as {node.id}", level)
            elif hasattr(_methods, node.id):
                self.add("_methods", node.id, 1)
            else:
                raise NameError(f"annotation {annotation!r} names {node.id!r}, unknown to _methods.py")

    def render(self) -> list[str]:
        # The standard library first, then the contracts, then this package.
        ordered = sorted(self.lines.items(), key=lambda item: (item[0][0] > 0, item[0][1] != "typing", item[0][1]))
        lines: list[str] = []
        group = None
        for (level, module), names in ordered:
            if group is not None and group != (level > 0, module == "typing"):
                lines.append("")
            group = (level > 0, module == "typing")
            statement = f"from {'.' * level + module} import "
            single = statement + ", ".join(sorted(names))
            lines.extend([single] if len(single) <= WIDTH else _wrap(statement, sorted(names), "", indent=4))
        return lines


def _import_table(source: str) -> dict[str, tuple[int, str, str]]:
    """name bound in _methods.py -> (relative level, module, imported name)."""
    table: dict[str, tuple[int, str, str]] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            for alias in node.names:
                table[alias.asname or alias.name] = (node.level, node.module or "", alias.name)
    return table


def _message_type(imports: Imports, descriptor) -> str:
    """pipeserve.v1.ClassifyTextResponse -> text_classification_pb2.ClassifyTextResponse."""
    module = Path(descriptor.file.name).stem + "_pb2"
    imports.add("pipeserve.v1", module)
    return f"{module}.{descriptor.name}"


# --- rendering ----------------------------------------------------------------------------

def _wrap(prefix: str, items: list[str], suffix: str, *, indent: int) -> list[str]:
    """prefix(item, item, ...)suffix packed into lines of WIDTH, continuation aligned after '('."""
    opening, closing = "(", ")"
    head = prefix + opening
    pad = " " * (len(head) if len(head) < WIDTH // 2 else indent)
    lines, current = [], head
    for index, item in enumerate(items):
        last = index == len(items) - 1
        piece = item + (closing + suffix if last else ",")
        if current.strip() and current != head and len(current) + 1 + len(piece) > WIDTH:
            lines.append(current.rstrip())
            current = pad + piece
        else:
            current += ("" if current == head else " ") + piece
    if not items:
        current += closing + suffix
    lines.append(current)
    return lines


def _def(prefix: str, parameters: list[str], returns: str, end: str = "") -> list[str]:
    """A method's def lines; a return type too long for the last line goes on its own, in
    parentheses."""
    lines = _wrap(prefix, parameters, f" -> {returns}:{end}", indent=8)
    if len(lines[-1]) > WIDTH:
        alternatives = returns.split(" | ")
        lines = _wrap(prefix, parameters, " -> (", indent=8)
        lines += [f"            {alternatives[0]}"] + [f"            | {other}" for other in alternatives[1:]]
        lines[-1] += f"):{end}"
    return lines


def _default(value: object) -> str:
    return '""' if value == "" else repr(value)


def _parameters(signature: inspect.Signature, stream: str | None = None,
                annotations: dict[str, str] | None = None) -> list[str]:
    """The parameter list as written, with `stream` narrowed for an overload (Literal[...])
    and the types of batch parameters as `annotations` gives them."""
    rendered, star_written = [], False
    for param in signature.parameters.values():
        if param.kind is param.KEYWORD_ONLY and not star_written:
            rendered.append("*")
            star_written = True
        if param.kind is param.VAR_POSITIONAL:
            star_written = True
        prefix = "*" if param.kind is param.VAR_POSITIONAL else "**" if param.kind is param.VAR_KEYWORD else ""
        annotation, default = (annotations or {}).get(param.name, param.annotation), param.default
        if param.name == "stream" and stream is not None:
            annotation = f"Literal[{stream}]"
            default = False if stream == "False" else inspect.Parameter.empty
        if annotations and param.name in annotations and annotations[param.name].startswith("list["):
            default = inspect.Parameter.empty  # the list overload is chosen by a list given, never by a default
        text = prefix + param.name + ("" if annotation is inspect.Parameter.empty else f": {annotation}")
        if default is not inspect.Parameter.empty:
            text += f" = {_default(default)}"
        rendered.append(text)
    return rendered


def _arguments(signature: inspect.Signature, single: dict[str, str] | None = None) -> list[str]:
    """The same parameters passed on to the describe function; those in `single` (a batch
    parameter past the list branch: one input) cast to its single-input type."""
    passed = []
    for param in signature.parameters.values():
        if single and param.name in single:
            value = f'cast("{single[param.name]}", {param.name})'
            passed.append(value if param.kind is param.POSITIONAL_OR_KEYWORD else f"{param.name}={value}")
        elif param.kind is param.VAR_POSITIONAL:
            passed.append(f"*{param.name}")
        elif param.kind is param.VAR_KEYWORD:
            passed.append(f"**{param.name}")
        elif param.kind is param.KEYWORD_ONLY:
            passed.append(f"{param.name}={param.name}")
        else:
            passed.append(param.name)
    return passed


def _batch_annotations(spec: MethodSpec, signature: inspect.Signature) -> list[dict[str, str]]:
    """The batch parameters' types, one mapping per overload: all single, then for each batch
    parameter in turn a list there, single before it, either after it (so no two overlap)."""
    single = {name: str(signature.parameters[name].annotation) for name in spec.batch}
    variants = [dict(single)]
    for position, name in enumerate(spec.batch):
        variant = {}
        for other_position, other in enumerate(spec.batch):
            listed = f"list[{single[other]}]"
            variant[other] = single[other] if other_position < position else listed if other == name \
                else f"{single[other]} | {listed}"
        variants.append(variant)
    return variants


def _batch_call(spec: MethodSpec, signature: inspect.Signature, flavour: Flavour) -> list[str]:
    """The lines that turn a call with lists into one call per input."""
    inputs = "{" + ", ".join(f'"{name}": {name}' for name in spec.batch) + "}"
    stream = ", stream" if spec.stream_rpc else ""
    lines = [f'        items = _methods.items_of("{spec.method_name}", {inputs}{stream})', "        if items is not None:"]
    passed = ["**item"]
    for param in signature.parameters.values():
        if param.name in spec.batch:
            continue
        if param.kind is param.VAR_KEYWORD:
            passed.append(f"**{param.name}")
        elif param.kind is param.VAR_POSITIONAL:
            raise ValueError(f"{spec.method_name}: a batch method may not take *{param.name}")
        elif param.name == "stream":
            passed.append("stream=False")  # items_of refused a list with stream=True
        else:
            passed.append(f"{param.name}={param.name}")
    awaited = "await " if flavour.is_async else ""
    lines += _wrap(f"            return {awaited}self._each(lambda item: self.{spec.method_name}", passed, ", items)",
                   indent=16)
    return lines


def _docstring(spec: MethodSpec, flavour: Flavour) -> list[str]:
    text = inspect.cleandoc(spec.describe.__doc__ or "")
    if flavour.is_async and spec.stream_rpc:
        text += "\n\nWith stream=True, await the call for the async iterator."
    lines = text.splitlines()
    indented = [lines[0]] + [("        " + line) if line else "" for line in lines[1:]]
    indented[0] = '        """' + indented[0]
    indented[-1] += '"""'
    return indented


def _method(spec: MethodSpec, flavour: Flavour, imports: Imports) -> list[str]:
    signature = inspect.signature(spec.describe)
    for reserved in ("self", "request"):
        if reserved in signature.parameters:
            raise ValueError(f"{spec.method_name}: a describe function may not take {reserved!r}")
    for param in signature.parameters.values():
        if param.annotation is not inspect.Parameter.empty:
            imports.mention(param.annotation)
    service = service_descriptor(spec.service)
    unary_type = _message_type(imports, service.methods_by_name[spec.rpc].output_type)
    iterator = flavour.iterator
    if spec.kind is not Kind.UNARY or spec.stream_rpc:
        imports.add("typing", iterator)
    if spec.unpack is not None:
        result = inspect.signature(spec.unpack).return_annotation
        imports.mention(result)
    elif spec.kind is Kind.UNARY:
        result = unary_type
    else:
        result = f"{iterator}[{unary_type}]"
    stream_type = None
    if spec.stream_rpc:
        if "stream" not in signature.parameters:
            raise ValueError(f"{spec.method_name}: a stream_rpc needs a `stream` parameter")
        stream_type = f"{iterator}[{_message_type(imports, service.methods_by_name[spec.stream_rpc].output_type)}]"
    for name in spec.batch:
        if name not in signature.parameters or signature.parameters[name].annotation is inspect.Parameter.empty:
            raise ValueError(f"{spec.method_name}: batch parameter {name!r} needs a type annotation")
    single = result
    # (parameter types, stream literal, return type) of each overload; none when only one.
    overloads: list[tuple[dict[str, str], str | None, str]] = []
    batch_variants = _batch_annotations(spec, signature) if spec.batch else [{}]
    literal = "False" if spec.stream_rpc else None
    # Lists first: an input type that admits Any (a numpy array, a PIL image) would match a
    # list too, and a type checker takes the first overload that matches.
    for annotations in batch_variants[1:]:
        overloads.append((annotations, literal, f"list[{single}]"))
    overloads.append((batch_variants[0], literal, single))
    if stream_type is not None:
        overloads.append((batch_variants[0], "True", stream_type))
    returns = [single] + ([f"list[{single}]"] if spec.batch else []) + ([stream_type] if stream_type else [])
    result = " | ".join(returns)
    implementation = {name: f"{single_type} | list[{single_type}]"
                      for name, single_type in batch_variants[0].items()}

    awaits = flavour.is_async and spec.kind is Kind.UNARY  # streams return their async iterator at once
    define = "async def" if awaits else "def"
    target = "self._client" if spec.group else "self"
    lines: list[str] = []
    if len(overloads) > 1:
        imports.add("typing", "overload")
        if stream_type is not None:
            imports.add("typing", "Literal")
        for annotations, stream_literal, overload_returns in overloads:
            lines.append("    @overload")
            lines += _def(f"    {define} {spec.method_name}",
                          ["self", *_parameters(signature, stream_literal, annotations)], overload_returns, " ...")
        lines.append("")
    lines += _def(f"    {define} {spec.method_name}", ["self", *_parameters(signature, None, implementation)], result)
    lines += _docstring(spec, flavour)
    if spec.batch:
        lines += _batch_call(spec, signature, flavour)
    if spec.batch:
        imports.add("typing", "cast")
    lines += _wrap(f"        request, timeout = _methods.{spec.describe.__name__}",
                   _arguments(signature, batch_variants[0] if spec.batch else None), "", indent=12)
    call = {Kind.UNARY: "_unary", Kind.SERVER_STREAM: "_stream", Kind.BIDI: "_bidi"}[spec.kind]
    invoke = f'{"await " if awaits else ""}{target}.{call}("{spec.service}", "{spec.rpc}", request, timeout)'
    if spec.stream_rpc:
        lines.append("        if stream:")
        lines.append(f'            return {target}._stream("{spec.service}", "{spec.stream_rpc}", request, timeout)')
    if spec.unpack is not None:
        invoke = f"_methods.{spec.unpack.__name__}({invoke})"
    lines.append(f"        return {invoke}")
    return lines


def render(flavour: Flavour) -> str:
    imports = Imports()
    imports.add("", "_methods", 1)
    imports.add("_calls", flavour.base, 1)
    groups: dict[str, list[str]] = {"": [], "models": []}
    for spec in _methods.METHODS:
        if spec.group not in groups:
            raise ValueError(f"{spec.method_name}: unknown group {spec.group!r}")
        groups[spec.group] += [""] + _method(spec, flavour, imports)
    body = [
        f"class {flavour.models_class}:",
        f'    """{flavour.models_doc}"""',
        "",
        f"    def __init__(self, client: {flavour.methods_class}) -> None:",
        "        self._client = client",
        *groups["models"],
        "",
        "",
        f"class {flavour.methods_class}({flavour.base}):",
        f'    """The task methods; {flavour.models_class} holds the ModelService ones."""',
        *groups[""],
    ]
    header = [
        f'"""{flavour.docstring}',
        "",
        'Generated by `python -m pipeserve_client._codegen` from _methods.py: edit that, not this."""',
        "from __future__ import annotations",
        "",
        *imports.render(),
        "",
        "",
    ]
    return "\n".join(header + body) + "\n"


def main(argv: list[str] | None = None) -> int:
    check = "--check" in (sys.argv[1:] if argv is None else argv)
    stale = []
    for flavour in FLAVOURS:
        path = PACKAGE_DIR / flavour.filename
        text = render(flavour)
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path.name)
        if not check:
            path.write_text(text)
    if stale:
        print(("out of date: " if check else "wrote: ") + ", ".join(stale))
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
