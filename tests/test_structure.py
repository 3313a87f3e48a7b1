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
import gc
import re
from pathlib import Path

import pytest

PACKAGE = "retroformer_cli"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
MODULE_MARK_LINES = 10  # a module's `# size:` reason must sit in its first lines
SIZE_MARK = "# size:"


@pytest.fixture(autouse=True)
def _no_gc_inside_parsing():
    """Python 3.11's ast.parse fails ("AST constructor recursion depth mismatch") when a garbage collection in the
    middle of it runs a finalizer that parses too (an unread asyncio task error left by an earlier test is logged
    with a formatted traceback). Collect first, then keep the collector off while these tests parse."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


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


# ----------------------------------------------------------------------------------------------------------------
# Names and homes (issue #22): no private name crosses a module boundary, "engine" and "common" each name one
# package, nothing public goes unused, and the layout in docs/contributing.md is the tree.

ROOT_NAMES = ("engine", "common")  # words that must name one module or package each
REPO = ROOT.parent
USERS = (ROOT, REPO / "benchmarks", REPO / "recipes")  # code whose use of a name counts (tests' use does not)
# Decorators that register a function with a framework (Typer commands, FastAPI routes, pydantic validators): the
# framework calls it, so it needs no caller of ours.
REGISTERING_DECORATORS = frozenset({"command", "callback", "config_command", "get", "post", "put", "delete", "websocket", "middleware",
                                    "exception_handler", "on_event", "model_validator", "field_validator"})


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(root: Path = ROOT) -> list[str]:
    """``from x import _y``, imports of a private module (``x._y``), and ``mod._y`` on an imported module of ours,
    where the importer is another module."""
    mods = _modules(root)
    known = set(mods)
    pkg = root.name
    out = []
    for module, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        rel = path.relative_to(root.parent).as_posix()
        module_aliases: set[str] = set()
        for node in _import_nodes(tree):
            if isinstance(node, ast.ImportFrom):
                base = _base(module, path, node)
                if not (base == pkg or base.startswith(pkg + ".")):
                    continue
                if any(_private(part) for part in base.split(".")):
                    out.append(f"{rel}:{node.lineno}: imports the private module {base}")
                for alias in node.names:
                    if f"{base}.{alias.name}" in known:
                        module_aliases.add(alias.asname or alias.name)
                        if _private(alias.name):
                            out.append(f"{rel}:{node.lineno}: imports the private module {base}.{alias.name}")
                    elif _private(alias.name):
                        out.append(f"{rel}:{node.lineno}: imports the private name {alias.name} from {base}")
            else:
                for alias in node.names:
                    if alias.name.split(".")[0] == pkg and any(_private(p) for p in alias.name.split(".")):
                        out.append(f"{rel}:{node.lineno}: imports the private module {alias.name}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                    and node.value.id in module_aliases):
                out.append(f"{rel}:{node.lineno}: uses the private name {node.value.id}.{node.attr}")
    return out


def word_homes(root: Path = ROOT, words: tuple[str, ...] = ROOT_NAMES) -> dict[str, set[str]]:
    """For each word, the distinct modules or packages whose own name holds it (a package's submodules live in
    their package's home)."""
    homes: dict[str, set[str]] = {w: set() for w in words}
    for module in _modules(root):
        parts = module.split(".")
        for word in words:
            for i, part in enumerate(parts[1:], start=1):
                if word in part:
                    homes[word].add(".".join(parts[: i + 1]))
                    break
    return homes


def _defined_names(tree: ast.Module) -> list[tuple[str, ast.AST]]:
    """Public top-level functions and classes, and public methods of public classes (Protocol members and
    methods registered by decorators aside: their callers are the protocol's users and the framework)."""
    out: list[tuple[str, ast.AST]] = []

    def registered(fn: ast.AST) -> bool:
        for dec in getattr(fn, "decorator_list", []):
            target = dec.func if isinstance(dec, ast.Call) else dec
            name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
            if name in REGISTERING_DECORATORS:
                return True
        return False

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _private(node.name):
            if not registered(node):
                out.append((node.name, node))
        elif isinstance(node, ast.ClassDef) and not _private(node.name):
            out.append((node.name, node))
            if any(getattr(b, "id", getattr(b, "attr", "")) == "Protocol" for b in node.bases):
                continue
            for sub in node.body:
                if (isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and not sub.name.startswith("_")
                        and not registered(sub)):
                    out.append((f"{node.name}.{sub.name}", sub))
    return out


def _used_names(paths: list[Path]) -> set[str]:
    """Every identifier read, imported or named in a string (``"module:Class"`` entry points, spawn targets)."""
    used: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Name):
                used.add(node.id)
            elif isinstance(node, ast.Attribute):
                used.add(node.attr)
            elif isinstance(node, ast.alias):
                used.add(node.name.rpartition(".")[2])
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                used.update(re.findall(r"[A-Za-z_]\w*", node.value))
    return used


def documented_names() -> set[str]:
    """Names in the code spans of README.md and docs/*.md: the documented API."""
    texts = [p.read_text(encoding="utf-8") for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
             if p.is_file()]
    return {name for text in texts for span in re.findall(r"`([^`\n]+)`", text)
            for name in re.findall(r"[A-Za-z_]\w*", span)}


def unused_definitions(root: Path = ROOT, users: tuple[Path, ...] = USERS,
                       documented: set[str] | None = None) -> list[str]:
    paths = sorted(p for u in users if u.exists() for p in (u.rglob("*.py") if u.is_dir() else [u]))
    used = _used_names(paths) | (documented_names() if documented is None else documented)
    out = []
    for path in _modules(root).values():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for qualname, node in _defined_names(tree):
            if qualname.rpartition(".")[2] not in used:
                out.append(f"{path.relative_to(root.parent).as_posix()}:{node.lineno}: {qualname}")
    return out


LAYOUT_DOCS = ("README.md", "docs/contributing.md")


def layout_block() -> tuple[str, str]:
    """The fenced block that starts with ``retroformer_cli/`` in the README or the contributing page."""
    for name in LAYOUT_DOCS:
        path = REPO / name
        if not path.is_file():
            continue
        for block in re.findall(r"```\n(retroformer_cli/\n.*?)```", path.read_text(encoding="utf-8"), re.S):
            return name, block
    raise AssertionError(f"no layout block (a fenced block starting with 'retroformer_cli/') in {LAYOUT_DOCS}")


def layout_of_block(block: str) -> dict[str, set[str]]:
    """``{package path: modules named}`` from a block whose entries start at two spaces: ``pkg/sub/  text`` opens
    a package (its ``x.py`` words, on its lines, are its modules); ``x.py  text`` is a top-level module."""
    layout: dict[str, set[str]] = {"": set()}
    current = ""
    for line in block.splitlines()[1:]:
        entry = re.match(r"^  (\S+)", line)
        if entry:
            head = entry.group(1)
            if head.endswith("/"):
                current = head.rstrip("/")
                layout.setdefault(current, set())
                words = line[entry.end():]
            else:
                current = ""
                words = head
        elif line.startswith("   "):
            words = line
        else:
            current = None  # a line outside the package tree (recipes/, tests/ ...)
            continue
        if current is not None:
            layout[current].update(w[:-3] for w in re.findall(r"\b[a-z_][a-z0-9_]*\.py\b", words))
    return layout


def layout_of_tree(root: Path = ROOT) -> dict[str, set[str]]:
    layout: dict[str, set[str]] = {}
    for init in sorted(root.rglob("__init__.py")):
        pkg = init.parent.relative_to(root).as_posix()
        layout["" if pkg == "." else pkg] = {p.stem for p in init.parent.glob("*.py") if p.stem != "__init__"}
    return layout


def test_no_private_name_crosses_a_module_boundary():
    offenders = private_imports()
    assert not offenders, "private names used from another module (make them public or move them):\n" + "\n".join(
        offenders)


def test_engine_and_common_each_name_one_package():
    homes = word_homes()
    assert homes["engine"] == {f"{PACKAGE}.llm.engine"}, homes["engine"]
    assert homes["common"] == {f"{PACKAGE}.stages.common"}, homes["common"]


def test_nothing_public_is_unused():
    offenders = unused_definitions()
    assert not offenders, ("public functions, classes or methods nothing in retroformer_cli/, benchmarks/, recipes/ "
                           "or the docs uses (delete them, or document them as API):\n" + "\n".join(offenders))


def test_layout_section_matches_the_tree():
    doc, block = layout_block()
    described, actual = layout_of_block(block), layout_of_tree()
    problems = [f"package {p or '(top level)'}/ is not in {doc}'s layout" for p in sorted(set(actual) - set(described))]
    problems += [f"{doc}'s layout names a package {p}/ that does not exist" for p in sorted(set(described) - set(actual))]
    for pkg in sorted(set(actual) & set(described)):
        where = f"{pkg}/" if pkg else ""
        problems += [f"{where}{m}.py is not in {doc}'s layout" for m in sorted(actual[pkg] - described[pkg])]
        problems += [f"{doc}'s layout names {where}{m}.py, which does not exist"
                     for m in sorted(described[pkg] - actual[pkg])]
    assert not problems, "\n".join(problems)


# The new checks catch what they claim to catch.


def test_name_checks_on_a_package_on_disk(tmp_path):
    pkg = tmp_path / "retroformer_cli"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def _helper():\n    pass\n\n\ndef used():\n    pass\n\n\ndef unused():\n    pass\n\n\n"
                              "class Thing:\n    def run(self):\n        pass\n\n    def never(self):\n        pass\n")
    (pkg / "b.py").write_text("from retroformer_cli.a import _helper, used\nfrom retroformer_cli import a\n"
                              "from . import a as mod\nx = mod._helper\ny = a.Thing().run\nz = 'retroformer_cli.a:used'\n")
    (pkg / "sub" / "_hidden.py").write_text("")
    (pkg / "sub" / "engine_room.py").write_text("from retroformer_cli.sub._hidden import *\n")
    (pkg / "engine.py").write_text("")
    assert private_imports(pkg) == [
        "retroformer_cli/b.py:1: imports the private name _helper from retroformer_cli.a",
        "retroformer_cli/b.py:4: uses the private name mod._helper",
        "retroformer_cli/sub/engine_room.py:1: imports the private module retroformer_cli.sub._hidden",
    ]
    assert word_homes(pkg, ("engine",)) == {"engine": {"retroformer_cli.engine", "retroformer_cli.sub.engine_room"}}
    assert unused_definitions(pkg, (pkg,), documented=set()) == [
        "retroformer_cli/a.py:9: unused", "retroformer_cli/a.py:17: Thing.never"]
    assert unused_definitions(pkg, (pkg,), documented={"never", "unused"}) == []


def test_layout_parser_reads_packages_and_modules():
    block = ("retroformer_cli/\n  cli.py     the root\n  envs/      registry, gym.py\n             hotpotqa.py\n"
             "  envs/webshop/  env.py\n  options.py  flags\nrecipes/   grpo_actor.py\n")
    assert layout_of_block(block) == {"": {"cli", "options"}, "envs": {"gym", "hotpotqa"}, "envs/webshop": {"env"}}
