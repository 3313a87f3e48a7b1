"""Structure rules for ``retroformer_cli/`` (issue #13): no import cycle, no module over 450 lines, no function
over 80 lines unless the code says why in a one-line ``# size: <reason>`` comment.

Import edges are read statically with ``ast``, relative imports resolved. Every import counts, including the
ones inside functions: a deferred import only postpones a cycle to call time (and makes it depend on call order),
it does not remove the two-way dependency between the modules. Imports under ``if TYPE_CHECKING:`` are left out:
they never run. ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``; the
implicit import of parent packages is not an edge (every submodule would otherwise form a cycle with a package
``__init__`` that re-exports it).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "retroformer_cli"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
MODULE_MARK_LINES = 10  # a module's `# size:` reason must sit in its first lines
SIZE_MARK = "# size:"


def _modules(root: Path = ROOT) -> dict[str, Path]:
    mods = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom node, at any depth, except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _base(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    parts = package.split(".")
    if node.level > 1:
        parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _targets(module: str, path: Path, node: ast.AST, known: set[str]) -> set[str]:
    out: set[str] = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            name = alias.name
            while name and name not in known:  # `import a.b.c` of a non-module attribute path
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
        return out
    base = _base(module, path, node)
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in known:
            out.add(sub)
        elif base in known:
            out.add(base)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = _modules(root)
    known = set(mods)
    graph: dict[str, set[str]] = {}
    for module, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        edges: set[str] = set()
        for node in _import_nodes(tree):
            edges |= _targets(module, path, node, known)
        edges.discard(module)
        graph[module] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each with one concrete cycle inside."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_one_cycle(graph, set(comp)) for comp in components]


def _one_cycle(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first inside the component)."""
    start = min(comp)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return list(reversed(path)) + [start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(comp)  # unreachable for a real component


def _has_mark(lines: list[str], lineno: int) -> bool:
    """A `# size:` reason on the def line (1-based ``lineno``), or as a comment line above it (or above its
    decorators)."""
    above = lineno - 2
    while above >= 0 and lines[above].lstrip().startswith("@"):
        above -= 1
    comment_above = above >= 0 and lines[above].lstrip().startswith(SIZE_MARK)
    return comment_above or SIZE_MARK in lines[lineno - 1]


def size_offenders(root: Path = ROOT) -> list[str]:
    out = []
    for module, path in _modules(root).items():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        rel = path.relative_to(root.parent).as_posix()
        head = lines[:MODULE_MARK_LINES]
        if len(lines) > MAX_MODULE_LINES and not any(SIZE_MARK in line for line in head):
            out.append(f"{rel}: module has {len(lines)} lines (limit {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text, str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            length = node.end_lineno - first + 1
            if length > MAX_FUNCTION_LINES and not _has_mark(lines, node.lineno):
                out.append(f"{rel}:{node.lineno}: {node.name}() has {length} lines (limit {MAX_FUNCTION_LINES})")
    return out


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50 and graph[f"{PACKAGE}.cli"], "the walk found no modules or no imports"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in retroformer_cli/:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_module_and_function_sizes():
    offenders = size_offenders()
    assert not offenders, (
        "over the size limits (split along a real seam, or add a one-line `# size: <reason>`):\n"
        + "\n".join(offenders)
    )


# The checks themselves must catch what they claim to catch.


def test_cycle_finder_reports_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_relative_deferred_and_type_checking_imports():
    src = (
        "from __future__ import annotations\nfrom typing import TYPE_CHECKING\nfrom .. import store\n"
        "from ..llm.engine import scheduler\nif TYPE_CHECKING:\n    from ..serve import app\n"
        "def f():\n    from ..workspace import Workspace\n    import retroformer_cli.records.Thing\n"
    )
    known = {f"{PACKAGE}.{m}" for m in ("store", "llm.engine.scheduler", "serve.app", "records", "workspace")}
    path = Path(PACKAGE, "stages", "mod.py")
    found: set[str] = set()
    for node in _import_nodes(ast.parse(src)):
        found |= _targets(f"{PACKAGE}.stages.mod", path, node, known)
    assert found == known - {f"{PACKAGE}.serve.app"}


def test_size_mark_is_found_on_def_or_above_decorators():
    lines = ["# size: a prompt table", "@decorator", "def f():", "    pass", "def g():  # size: why", "def h():",
             "    x = 1  # size: not a comment line", "def i():"]
    assert _has_mark(lines, 3)
    assert _has_mark(lines, 5)
    assert not _has_mark(lines, 6)
    assert not _has_mark(lines, 8)


def test_checks_on_a_package_on_disk(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub.b import g\n")  # deferred import still counts
    (pkg / "sub" / "b.py").write_text("from ..c import h\n")
    (pkg / "c.py").write_text("from . import a\n")
    long_body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    (pkg / "d.py").write_text(f"def long():\n{long_body}\n# size: a table\ndef kept():\n{long_body}")
    (pkg / "e.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    (pkg / "f.py").write_text("# size: generated table\n" + "x = 1\n" * (MAX_MODULE_LINES + 1))
    graph = import_graph(pkg)
    assert graph["pkg"] == {"pkg.sub.b"}
    assert find_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]
    assert size_offenders(pkg) == [
        f"pkg/d.py:1: long() has {MAX_FUNCTION_LINES + 1} lines (limit {MAX_FUNCTION_LINES})",
        f"pkg/e.py: module has {MAX_MODULE_LINES + 1} lines (limit {MAX_MODULE_LINES})",
    ]
