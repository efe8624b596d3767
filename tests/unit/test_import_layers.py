"""No import circle in the package: neither among its modules nor among its subpackages.

Every import counts, the ones inside functions too (a lazy import still makes the two
modules depend on each other); only ``if TYPE_CHECKING:`` blocks, which never run, are left
out. The graph is read from the source with ``ast``, so nothing is imported.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = "megatron_cegppo"
PACKAGE_DIR = Path(__file__).resolve().parents[2] / ROOT


def _modules(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Dotted name -> source file, for every module and package of the package."""
    found = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if "__pycache__" in parts:
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` outside ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(node, ast.If) and _is_type_checking(node.test) and child in node.body:
                continue
            stack.append(child)


def _top_level_names(tree: ast.Module) -> set[str]:
    """Names a module binds at its top level (definitions, assignments, imports)."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _place_order(where: str) -> tuple[str, int]:
    file, _, rest = where.partition(":")
    return file, int(rest.split()[0])


class ImportGraph:
    """``edges[a][b]``: the places (``file:line``) where module ``a`` imports module ``b``."""

    def __init__(self, modules: dict[str, Path]):
        self.modules = modules
        self.trees = {name: ast.parse(path.read_text(encoding="utf-8"), str(path)) for name, path in modules.items()}
        self.bound = {name: _top_level_names(tree) for name, tree in self.trees.items()}
        self.edges: dict[str, dict[str, list[str]]] = defaultdict(dict)
        for name, tree in self.trees.items():
            for node in _runtime_nodes(tree):
                for target in self._targets(name, node):
                    if target != name:
                        self._add(self.edges, name, target, f"{self._where(name)}:{node.lineno}")

    @staticmethod
    def _add(edges: dict, a: str, b: str, where: str) -> None:
        places = edges[a].setdefault(b, [])
        if where not in places:
            places.append(where)
            places.sort(key=_place_order)

    def _where(self, name: str) -> str:
        """The module's file, relative to the folder that holds the package."""
        path = self.modules[name]
        return path.relative_to(path.parents[name.count(".") + (path.name == "__init__.py")]).as_posix()

    def _is_package(self, name: str) -> bool:
        return self.modules[name].name == "__init__.py"

    def _existing(self, dotted: str) -> str | None:
        """The longest prefix of ``dotted`` that is a module of the package."""
        parts = dotted.split(".")
        while parts:
            if ".".join(parts) in self.modules:
                return ".".join(parts)
            parts.pop()
        return None

    def _home_of(self, package: str, name: str) -> str | None:
        """The submodule that defines ``name`` when ``package`` serves it without binding it
        (a lazy module ``__getattr__``)."""
        if name in self.bound[package] or not self._is_package(package):
            return None
        homes = [m for m in self.modules if m.rpartition(".")[0] == package and name in self.bound[m]]
        return homes[0] if len(homes) == 1 else None

    def _targets(self, module: str, node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [t for a in node.names if a.name.split(".")[0] == ROOT for t in [self._existing(a.name)] if t]
        if isinstance(node, ast.ImportFrom):
            if node.level:
                package = module if self._is_package(module) else module.rpartition(".")[0]
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != ROOT or source not in self.modules:
                return []
            out = []
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in self.modules:
                    out.append(sub)
                else:
                    out.append(source)
                    home = self._home_of(source, alias.name)
                    if home:
                        out.append(home)
            return out
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            value = node.args[0].value
            if called in ("import_module", "__import__") and isinstance(value, str) and value.split(".")[0] == ROOT:
                target = self._existing(value)
                return [target] if target else []
        return []

    def subpackage_edges(self) -> dict[str, dict[str, list[str]]]:
        """The same imports between the package's first-level parts (subpackages and
        top-level modules)."""
        def part(name: str) -> str:
            return ".".join(name.split(".")[:2])

        out: dict[str, dict[str, list[str]]] = defaultdict(dict)
        for a, targets in self.edges.items():
            for b, places in targets.items():
                if part(a) != part(b) and ROOT not in (part(a), part(b)):
                    for where in places:
                        self._add(out, part(a), part(b), f"{where} ({a} -> {b})")
        return out


def strongly_connected(edges: dict[str, dict]) -> list[list[str]]:
    """The graph's strongly connected parts of more than one node (Tarjan), each sorted."""
    index, low, on_stack, stack, parts = {}, {}, set(), [], []
    nodes = sorted(set(edges) | {b for t in edges.values() for b in t})

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, {})):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                parts.append(sorted(part))

    for v in nodes:
        if v not in index:
            visit(v)
    return sorted(parts)


def cycles(edges: dict[str, dict], limit: int = 50) -> list[list[str]]:
    """The elementary cycles (each starting at its smallest node), at most ``limit`` per
    strongly connected part."""
    found = []
    for part in strongly_connected(edges):
        members, count = set(part), 0
        for start in part:
            path, blocked = [start], {start}

            def walk(v: str) -> None:
                nonlocal count
                for w in sorted(edges.get(v, {})):
                    if count >= limit or w not in members or w < start:
                        continue
                    if w == start:
                        found.append(path + [start])
                        count += 1
                    elif w not in blocked:
                        path.append(w)
                        blocked.add(w)
                        walk(w)
                        blocked.discard(w)
                        path.pop()

            walk(start)
    return found


def describe(cycle: list[str], edges: dict[str, dict[str, list[str]]]) -> str:
    steps = [f"{a} -> {b} [{', '.join(edges[a][b])}]" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(cycle) + "\n      " + "\n      ".join(steps)


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return ImportGraph(_modules())


def test_no_import_cycle_among_modules(graph):
    found = cycles(graph.edges)
    assert not found, "import cycles among modules:\n  " + "\n  ".join(describe(c, graph.edges) for c in found)


def test_no_import_cycle_among_subpackages(graph):
    edges = graph.subpackage_edges()
    found = cycles(edges)
    assert not found, "import cycles among subpackages:\n  " + "\n  ".join(describe(c, edges) for c in found)


# -- the reader itself, on a package made for it ---------------------------------------------


def _write(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        path = root / ROOT / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return _modules(root / ROOT)


def test_reader_counts_lazy_relative_and_served_imports(tmp_path):
    graph = ImportGraph(_write(tmp_path, {
        "__init__.py": "",
        "a/__init__.py": "def __getattr__(name):\n    ...\n",
        "a/one.py": "def f():\n    from megatron_cegppo.b import two\n",
        "a/three.py": "THING = 1\n",
        "b/__init__.py": "",
        "b/two.py": "from ..a import THING\nfrom . import four\n",
        "b/four.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import megatron_cegppo.a.one\n",
    }))
    assert set(graph.edges["megatron_cegppo.a.one"]) == {"megatron_cegppo.b.two"}
    assert set(graph.edges["megatron_cegppo.b.two"]) == {"megatron_cegppo.a", "megatron_cegppo.a.three",
                                                          "megatron_cegppo.b.four"}
    assert "megatron_cegppo.b.four" not in graph.edges  # TYPE_CHECKING imports never run
    assert [sorted(c) for c in cycles(graph.subpackage_edges())] == [
        ["megatron_cegppo.a", "megatron_cegppo.a", "megatron_cegppo.b"]]
    assert cycles(graph.edges) == []
