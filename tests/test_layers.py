"""The package's folders are its layers, and imports run one way (docs/design/layers.md).

Every ``import`` in ``segcli/`` is read from the source (module level and inside functions alike; only
``if TYPE_CHECKING:`` blocks are left out, since they never run), so a circle cannot hide behind a local
import. Three rules:

1. a module imports only from its own layer or the layers below it (``ALLOWED``);
2. no import circles between modules;
3. no module imports another module's private (``_``-prefixed) names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "segcli"

# Layer of each module, by its dotted name's prefix (the longest prefix wins).
LAYERS = {
    "segcli": "face",  # the package's __init__ (lazy public names) and __main__
    "segcli.errors": "base",
    "segcli.config": "base",
    "segcli.timings": "base",
    "segcli.io": "io",
    "segcli.method": "method",
    "segcli.vit": "vit",
    "segcli.engines": "engines",
    "segcli.evaluate": "evaluate",
    "segcli.cli": "face",
    "segcli.entry": "face",
    "segcli.pipeline": "face",
    "segcli.ray_segmenter": "face",
    "segcli.report": "face",
    "segcli.html_report": "face",
    "segcli.html_report_data": "face",
    "segcli.__main__": "face",
}

# What each layer may import (besides itself). io and method know nothing of the ViT, the engines, Ray or the
# CLI; evaluate reads files and knows nothing of the method.
ALLOWED = {
    "base": set(),
    "io": {"base"},
    "method": {"base", "io"},
    "vit": {"base", "io", "method"},
    "engines": {"base", "io", "method", "vit"},
    "evaluate": {"base", "io"},
    "face": {"base", "io", "method", "vit", "engines", "evaluate"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(name: str) -> str:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[best]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) of every segcli import that can run."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, list[str], int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, [], child.lineno) for a in child.names if a.name.split(".")[0] == "segcli")
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                if base.split(".")[0] == "segcli":
                    found.append((base, [a.name for a in child.names], child.lineno))
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(target: str, names: list[str], modules: dict[str, Path]) -> list[str]:
    """The modules an import statement loads: ``from segcli.io import storage`` loads segcli.io.storage."""
    out = [target] if target in modules else []
    out += [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
    return out or [target]


def edges() -> list[tuple[str, str, list[str], int]]:
    modules = all_modules()
    result = []
    for name, path in modules.items():
        for target, names, line in imports(path):
            for dep in resolve(target, names, modules):
                result.append((name, dep, names if dep == target else [], line))
    return result


def test_every_module_has_a_layer():
    for name in all_modules():
        assert layer_of(name) in ALLOWED, name


def test_imports_run_one_way():
    wrong = []
    for src, dst, _, line in edges():
        a, b = layer_of(src), layer_of(dst)
        if a != b and b not in ALLOWED[a] and not (src == "segcli" or dst == "segcli"):
            wrong.append(f"{src}:{line} ({a}) imports {dst} ({b})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    graph = nx.DiGraph()
    for src, dst, _, _ in edges():
        # A package's __init__ importing its own submodules is how a package is built, not a circle.
        if src != dst and not dst.startswith(src + "."):
            graph.add_edge(src, dst)
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, cycles


def test_no_private_names_across_modules():
    wrong = [f"{src}:{line} imports {n} from {dst}" for src, dst, names, line in edges()
             for n in names if n.startswith("_") and n != "__version__" and src != dst]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("rule", sorted(ALLOWED))
def test_layers_are_acyclic(rule):
    """The allowed-imports table itself is a strict order (a layer never allows one that allows it back)."""
    for other in ALLOWED[rule]:
        assert rule not in ALLOWED[other]
