"""modula's import layers: every import of a modula module points down (or within its layer),
sits at module top, and no two modula modules import each other in a circle.

The table is the architecture (docs/architecture.md); a change to it is a design decision, not
a way to make this test pass. ``modula.cli`` loads a command's module by name when the command
runs (its table of contents, :data:`modula.cli.COMMANDS`): those are not imports.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "modula"

# lowest first; a module may import its own layer and the layers below it
LAYERS: tuple[tuple[str, ...], ...] = (
    ("modula", "modula.errors"),
    ("modula.config",),
    ("modula.kernels",),
    ("modula.infra",),
    ("modula.data",),
    ("modula.model", "modula.basemodel"),
    ("modula.trainers", "modula.eval", "modula.serving"),
    ("modula.tuning",),
    ("modula.cluster", "modula.cli", "modula.demo"),
)


# modules imported inside a function on purpose, and why; nothing else may be
LAZY = {
    "modula.kernels._triton_src": "importing the kernel sources imports triton, an optional "
                                  "package, and must wait until a Triton kernel is first used",
}


def layer_of(module: str) -> int:
    """The layer of a module: the longest table entry that is the module or a package above it."""
    best, depth = None, -1
    for level, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and p.count(".") > depth:
                best, depth = level, p.count(".")
    if best is None:
        raise KeyError(f"{module} is in no layer of the table")
    return best


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported modula module
    line: int
    in_function: bool


def module_name(path: Path, root: Path = PACKAGE_ROOT) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> list[Import]:
    """Every import of a modula module in `source`: module top, functions, ``if TYPE_CHECKING``.
    ``from pkg import name`` targets ``pkg.name`` when that is a module, else ``pkg``."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                      ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name == "modula" or alias.name.startswith("modula."):
                        found.append(Import(module, alias.name, child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target == "modula" or target.startswith("modula."):
                    for alias in child.names:
                        sub = f"{target}.{alias.name}"
                        found.append(Import(module, sub if sub in known else target,
                                            child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return list(dict.fromkeys(found))  # one per (target, line): `from m import a, b` is one


def all_modules(root: Path = PACKAGE_ROOT) -> dict[str, tuple[str, bool]]:
    """module name -> (source, is_package) for every module under modula/."""
    return {module_name(p, root): (p.read_text(), p.name == "__init__.py")
            for p in sorted(root.rglob("*.py"))}


def all_imports(modules: dict[str, tuple[str, bool]]) -> list[Import]:
    known = set(modules)
    return [imp for name, (src, pkg) in modules.items()
            for imp in imports_of(src, name, pkg, known)]


def upward(imports: list[Import]) -> list[Import]:
    return [i for i in imports if layer_of(i.target) > layer_of(i.source)]


def cycles(imports: list[Import]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for i in imports:
        if i.target != i.source:
            graph.setdefault(i.source, set()).add(i.target)
            graph.setdefault(i.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return out


def problems(modules: dict[str, tuple[str, bool]]) -> list[str]:
    imports = all_imports(modules)
    out = [f"{i.source}:{i.line} imports {i.target} (layer {layer_of(i.target)} above "
           f"{layer_of(i.source)})" for i in upward(imports)]
    out += [f"{i.source}:{i.line} imports {i.target} inside a function" for i in imports
            if i.in_function and i.target not in LAZY]
    out += [f"import cycle: {' <-> '.join(c)}" for c in cycles(imports)]
    return out


# ------------------------------------------------------------------------------------ tests


def test_every_module_has_a_layer():
    for name in all_modules():
        layer_of(name)


def test_imports_point_down_at_module_top_without_cycles():
    found = problems(all_modules())
    assert not found, "\n".join(found)


def test_checker_catches_a_planted_upward_import():
    modules = all_modules()
    modules["modula.model.planted"] = (
        "from modula.serving.protocol import APIError\n", False)
    found = set(problems(modules)) - set(problems(all_modules()))
    assert found == {"modula.model.planted:1 imports modula.serving.protocol (layer 6 above 5)"}


def test_checker_catches_function_level_imports_and_cycles():
    modules = {
        "modula.data.a": ("def f():\n    from modula.data import b\n", False),
        "modula.data.b": ("import modula.data.a\n", False),
        "modula.data": ("", True),
    }
    found = problems(modules)
    assert "modula.data.a:2 imports modula.data.b inside a function" in found
    assert "import cycle: modula.data.a <-> modula.data.b" in found


@pytest.mark.parametrize("source, target", [
    ("from . import layer\n", "modula.model.layer"),
    ("from .layer import ModulaLinear\n", "modula.model.layer"),
    ("from ..kernels import expert_mixture\n", "modula.kernels"),
    ("if TYPE_CHECKING:\n    import modula.serving.app\n", "modula.serving.app"),
])
def test_relative_and_type_checking_imports_are_read(source, target):
    known = set(all_modules()) | {"modula.model.layer"}
    found = imports_of(source, "modula.model.files", False, known)
    assert [i.target for i in found] == [target]


def test_every_command_module_registers():
    """The CLI's table of contents names modules that exist and define register(app)."""
    from modula.cli import COMMANDS

    modules = all_modules()
    for command, module in COMMANDS.items():
        assert module in modules, f"{command}: no module {module}"
        tree = ast.parse(modules[module][0])
        assert any(isinstance(n, ast.FunctionDef) and n.name == "register" for n in tree.body), \
            f"{module} has no register(app)"
