"""The package's layers (docs/architecture.md): every import points downward or sideways within a
layer, and the module graph has no cycle. Imports are read with `ast` (function-level and
TYPE_CHECKING imports count too), so nothing is executed."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = "paddle_ernie5"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE

# Bottom to top. A module belongs to the layer of its first dotted component under the package.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "io", "plugins", "cpu"),
    ("config",),
    ("ops",),
    ("model",),
    ("optim",),
    ("parallel",),
    ("tokenizers",),
    ("data",),
    ("eval",),
    ("train",),
    ("rl",),
    ("generate", "cli"),
)


def module_name(path: pathlib.Path, root: pathlib.Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def import_graph(root: pathlib.Path, package: str) -> dict[str, set[str]]:
    """module -> the package modules it imports (`from a import b` counts as a.b when b is a
    module)."""
    files = {module_name(p, root, package): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    parent = ".".join(base + ([node.module] if node.module else []))
                else:
                    parent = node.module or ""
                targets = [
                    f"{parent}.{a.name}" if f"{parent}.{a.name}" in files else parent
                    for a in node.names
                ]
            else:
                continue
            for t in targets:
                while t and t not in files:  # `import a.b.c` of a non-module attribute: its module
                    t = t.rpartition(".")[0]
                if t.startswith(package) and t != mod:
                    deps.add(t)
        graph[mod] = deps
    return graph


def layer_of(mod: str, package: str) -> int | None:
    head = mod[len(package) + 1 :].split(".")[0]
    for i, names in enumerate(LAYERS):
        if head in names:
            return i
    return None


def upward_imports(graph: dict[str, set[str]], package: str) -> list[str]:
    out = []
    for mod, deps in sorted(graph.items()):
        here = layer_of(mod, package)
        for dep in sorted(deps):
            there = layer_of(dep, package)
            if dep == package or here is None:
                continue
            if there is None or there > here:
                out.append(f"{mod} -> {dep}")
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_top_level_module_has_a_layer():
    graph = import_graph(ROOT, PACKAGE)
    missing = sorted({m for m in graph if m != PACKAGE and layer_of(m, PACKAGE) is None})
    assert not missing, f"add these to LAYERS and docs/architecture.md: {missing}"


def test_imports_point_downward():
    assert upward_imports(import_graph(ROOT, PACKAGE), PACKAGE) == []


def test_no_import_cycles():
    assert cycles(import_graph(ROOT, PACKAGE)) == []


def test_layers_match_docs():
    doc = (ROOT.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    line = next(l for l in doc.splitlines() if l.startswith("Layers, bottom to top:"))
    named = [part.strip() for part in line.partition(":")[2].rstrip(".").split("->")]
    assert named == [", ".join(names) for names in LAYERS]


def _write(root: pathlib.Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from ..train import loop\n", "pkg.model.block -> pkg.train.loop"),
        ("def f():\n    from pkg.train.loop import run\n", "pkg.model.block -> pkg.train.loop"),
        ("import pkg.eval.suite\n", "pkg.model.block -> pkg.eval.suite"),
    ],
)
def test_checker_catches_a_synthetic_upward_import(tmp_path, source, expected):
    root = tmp_path / "pkg"
    _write(
        root,
        {
            "__init__.py": "",
            "model/__init__.py": "",
            "model/norm.py": "",
            "train/__init__.py": "",
            "train/loop.py": "from ..model import norm\n",
            "eval/__init__.py": "",
            "eval/suite.py": "",
            "model/block.py": "from . import norm\n" + source,
        },
    )
    graph = import_graph(root, "pkg")
    assert upward_imports(graph, "pkg") == [expected]
    assert cycles(graph) == []


def test_checker_catches_a_synthetic_cycle(tmp_path):
    root = tmp_path / "pkg"
    _write(
        root,
        {
            "__init__.py": "",
            "rl/__init__.py": "",
            "rl/a.py": "from .b import x\n",
            "rl/b.py": "def f():\n    from . import a\n",
        },
    )
    graph = import_graph(root, "pkg")
    assert upward_imports(graph, "pkg") == []
    assert cycles(graph) == [["pkg.rl.a", "pkg.rl.b"]]
