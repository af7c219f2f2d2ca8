"""The package's layout rules, read from the source with ``ast`` (nothing is imported):
no import cycles (imports inside functions count too), no source file over 500
lines, and the README's Layout section naming every folder of ``dem_jax/``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Each tree is its own import namespace: the folder that is put on sys.path.
TREES = {"dem_jax": ROOT, "tpu_launcher": ROOT / "launch"}
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of every tree."""
    found = {}
    for top, base in TREES.items():
        for path in sorted((base / top).rglob("*.py")):
            parts = path.relative_to(base).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    found["dem_tpu"] = ROOT / "launch" / "dem_tpu.py"
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports, at any depth of its code."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    if sub in modules:  # `from pkg import module`
                        deps.add(sub)
                    elif node.module in modules:
                        deps.add(node.module)
        graph[name] = deps - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    modules = _modules()
    graph = import_graph(modules)
    assert sum(len(d) for d in graph.values()) > 100  # the graph was really read
    assert cycles(graph) == []


@pytest.mark.parametrize("top", sorted(TREES))
def test_no_source_file_over_500_lines(top):
    long = {
        str(p.relative_to(ROOT)): n
        for name, p in _modules().items()
        if name.split(".")[0] == top and (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_readme_layout_names_every_folder():
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    listed = set(re.findall(r"^\s*([a-z_]+)/", block, re.M))
    folders = {
        p.name for p in (ROOT / "dem_jax").iterdir() if p.is_dir() and (p / "__init__.py").exists()
    }
    assert folders - listed == set(), "folders missing from the README's Layout section"
    for name in listed & folders:
        assert (ROOT / "dem_jax" / name / "__init__.py").read_text().startswith('"""'), name


# The layers of dem_jax/, lowest first (the README's Layout order): a module may
# import its own layer and the layers before it, never a later one.
LAYERS = (
    "errors",
    "lazy",
    "config",
    "model",
    "sharding",
    "io",
    "data",
    "train",
    "vectors",
    "merge",
    "search",
    "mixture",
    "pipeline",
    "plan",
    "demo",
    "commands",
    "api",
    "cli",
)


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("__init__", "__main__"):
        return len(LAYERS)  # the package itself re-exports the public API
    return LAYERS.index(parts[1])


def test_layers_import_only_downwards():
    modules = {n: p for n, p in _modules().items() if n.startswith("dem_jax")}
    upward = [
        (name, dep)
        for name, deps in import_graph(modules).items()
        for dep in deps
        if _layer(dep) > _layer(name)
    ]
    assert upward == []
