"""The package's shape, read from its source with the standard library's ``ast``: no import
circle, imports only down the layers raytrain/__init__.py describes, short functions, and a
reason at the top of any long module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "raytrain"

# Lower layers first; a module may import from its own layer and the ones before it.
LAYERS = [
    {"errors", "config", "storage", "runs", "model", "evaluate", "cluster", "tracking"},
    {"data", "report"},
    {"train"},
    {"inference", "sweep"},
    {"commands"},
    {"cli", "main", "__main__"},
]
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 450
LONG_MODULE_NOTE = "Why one long module"


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["raytrain", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The raytrain modules ``name`` imports (anywhere in it, lazy imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for index, layer in enumerate(LAYERS):
        if top in layer:
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and raytrain/__init__.py")


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, as the modules on it (Tarjan's strongly connected components)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
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
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_circle():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_import_goes_down_the_layers():
    upward = [
        f"{name} imports {target}"
        for name, targets in graph().items()
        if name != "raytrain"
        for target in targets
        if target != "raytrain" and layer_of(target) > layer_of(name)
    ]
    assert upward == []


def test_no_command_imports_another_command_or_the_cli():
    crossing = [
        f"{name} imports {target}"
        for name, targets in graph().items()
        if name.startswith("raytrain.commands.")
        for target in targets
        if target == "raytrain.cli"
        or (target.startswith("raytrain.commands.") and target != "raytrain.commands.args")
    ]
    assert crossing == []


def test_every_package_says_what_it_owns_and_may_import():
    for init in sorted(PACKAGE.rglob("__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in doc, (
            f"{init.relative_to(PACKAGE.parent)} does not say what it may import"
        )


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_functions_are_short_and_long_modules_say_why(path: Path):
    source = path.read_text()
    tree = ast.parse(source)
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []
    if len(source.splitlines()) > MAX_MODULE_LINES:
        assert LONG_MODULE_NOTE in (ast.get_docstring(tree) or ""), (
            f"{path.name} has over {MAX_MODULE_LINES} lines: say why in its docstring "
            f"({LONG_MODULE_NOTE}: ...) or split it"
        )
