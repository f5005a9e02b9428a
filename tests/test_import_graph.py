"""The modules of the fused_accum package import one another without a circle.

The graph is read from the source with :mod:`ast`, nothing imported: an edge A -> B for every
``import fused_accum.B``, ``from fused_accum.B import x``, ``from . import B`` (B a submodule),
``from .B import x`` and ``importlib.import_module("<literal>")`` in A, at module level and in
functions alike (an import inside a function still runs, only later: hiding a circle there is
still a circle).  Not edges: imports under ``if TYPE_CHECKING:`` (never run) and those in a
module-level ``__getattr__`` (PEP 562: a load on first use of an attribute of the finished
module, there for optional frameworks such as ``fused_accum.integrations.<framework>``).  Imports
by a computed name are declared in ``COMPUTED``.  Importing ``a.b.c`` also runs the packages
``a.b`` and ``a`` first: those are edges too, except for the importer's own packages (Python has
them in hand before the importer runs: ``from .. import x`` in a module that ``fused_accum``
imports is no circle unless ``x`` is a name, not a submodule).
"""
import ast
from pathlib import Path

import pytest

from fused_accum import examples, kernels

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "fused_accum"

# Imports by a computed name (importlib.import_module of a variable): the importer, and the
# modules it may import.
COMPUTED = {
    "fused_accum.kernels": sorted(kernels._BACKENDS.values()),   # the backend table
    "fused_accum.cli.demo": [f"fused_accum.examples.{name}" for name, _ in examples.EXAMPLES],
}

# Circles known today, each as the set of modules it joins, with why it stays: the test fails on
# any other circle, and on one of these once it is gone (then delete it here).  None today: the
# package, checked at module level and in functions, has none.
KNOWN_CIRCLES: dict[frozenset[str], str] = {}


def module_names(package_dir: Path) -> dict[str, Path]:
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _statements(tree: ast.Module):
    """Every node of the module but what a TYPE_CHECKING block or a module __getattr__ holds."""
    skip = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            skip.add(node)
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(node.body)
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(child for child in ast.iter_child_nodes(node) if child not in skip)


def imports(name: str, path: Path, modules: dict[str, Path], package: str) -> dict[str, int]:
    """The modules of the package that module ``name`` imports, each with a line that does."""
    is_package = path.name == "__init__.py"
    own_package = name if is_package else name.rpartition(".")[0]

    found: dict[str, int] = {}

    def add(dotted: str, line: int) -> None:
        """Module ``dotted`` imported: it and its packages run, less the importer's own packages
        (in hand already) unless named themselves; a name that is no module here (a compiled
        extension) runs only its packages."""
        for module in [*_ancestors(dotted), dotted]:
            if module not in modules or module == name:
                continue
            if module != dotted and module in _ancestors(name):
                continue
            found.setdefault(module, line)

    for node in _statements(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == package:
                    add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = own_package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != package:
                continue
            for alias in node.names:   # a submodule, or a name of the module imported from
                sub = f"{source}.{alias.name}"
                add(sub if sub in modules else source, node.lineno)
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and ast.unparse(node.func).endswith("import_module")):
            target = node.args[0].value
            if target.startswith("."):
                anchor = ast.unparse(node.args[1]) if len(node.args) > 1 else ""
                anchor = {"__name__": name, "__package__": own_package}.get(anchor)
                if anchor is None:
                    continue
                level = len(target) - len(target.lstrip("."))
                base = anchor.split(".")
                target = ".".join(base[:len(base) - (level - 1)] + [target.lstrip(".")])
            if target.split(".")[0] == package:
                add(target, node.lineno)
    return found


def import_graph(package_dir: Path, computed: dict[str, list[str]] | None = None
                 ) -> dict[str, dict[str, int]]:
    modules = module_names(package_dir)
    graph = {name: imports(name, path, modules, package_dir.name) for name, path in modules.items()}
    for importer, targets in (computed or {}).items():
        for target in targets:
            assert target in modules, f"COMPUTED names {target}, which is not a module"
            graph[importer].setdefault(target, 0)
    return graph


def circles(graph: dict[str, dict[str, int]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def describe(circle: frozenset[str], graph: dict[str, dict[str, int]]) -> str:
    return "; ".join(f"{a}:{graph[a][b] or ' (COMPUTED)'} -> {b}" for a in sorted(circle)
                     for b in sorted(graph[a]) if b in circle)


@pytest.fixture(scope="module")
def graph():
    return import_graph(ROOT / PACKAGE, COMPUTED)


def test_the_package_has_no_new_import_circle(graph):
    new = [c for c in circles(graph) if c not in KNOWN_CIRCLES]
    assert not new, "import circles:\n" + "\n".join(describe(c, graph) for c in new)


def test_the_known_circles_are_still_there(graph):
    gone = set(KNOWN_CIRCLES) - set(circles(graph))
    assert not gone, f"no longer circles, delete them from KNOWN_CIRCLES: {gone}"


def test_the_command_line_is_imported_by_nothing_below_it(graph):
    """fused_accum.cli and __main__ import the rest, never the other way (the examples once
    imported the demo that loaded them)."""
    top = ("fused_accum.cli", "fused_accum.__main__")
    for importer, targets in graph.items():
        if not importer.startswith(top):
            assert not [t for t in targets if t.startswith(top)], (importer, targets)


def test_the_graph_sees_real_imports(graph):
    assert "fused_accum.accumulation" in graph["fused_accum.optim.base"]     # from ..accumulation
    assert "fused_accum.distributed.data_parallel" in graph["fused_accum.optim.base"]   # from .. import
    assert "fused_accum.kernels.build" in graph["fused_accum.accumulation.hooks"]   # in a function
    assert "fused_accum.kernels.triton_ops" in graph["fused_accum.bench.tune"]   # a package run
    assert "fused_accum" in graph["fused_accum.cli.demo"]                    # from .. import __version__
    assert "fused_accum" not in graph["fused_accum.optim.base"]              # from .. import guards
    assert "fused_accum.examples.digits" in graph["fused_accum.cli.demo"]    # COMPUTED


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


@pytest.mark.parametrize("how", [
    "from . import b",                                   # a submodule by from .
    "from .b import thing",                              # a name of a sibling
    "import pkg.b",                                      # absolute
    "from pkg.b import thing",
    "def later():\n    from .b import thing",           # in a function
    "import importlib\nimportlib.import_module('pkg.b')",
    "from .sub import leaf",                             # through a package's __init__
])
def test_a_circle_is_found_however_it_is_written(how, tmp_path):
    package = _write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": how + "\n",
                                "pkg/b.py": "from .a import x\nthing = 1\n",
                                "pkg/sub/__init__.py": "from ..b import thing\n",
                                "pkg/sub/leaf.py": ""})
    (circle,) = circles(import_graph(package))
    assert {"pkg.a", "pkg.b"} <= circle


@pytest.mark.parametrize("how", [
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import thing",
    "def __getattr__(name):\n    import importlib\n    return importlib.import_module('.b', __package__)",
])
def test_type_only_and_lazy_attribute_imports_are_no_circle(how, tmp_path):
    package = _write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": how + "\n",
                                "pkg/b.py": "from .a import x\n"})
    assert circles(import_graph(package)) == []


@pytest.mark.parametrize("how, circle", [
    ("from . import b", []),                            # a submodule: pkg is in hand already
    ("from .. import b", []),
    ("from .. import version", [frozenset({"pkg", "pkg.inner.a"})]),   # a name of pkg's
    ("import pkg", [frozenset({"pkg", "pkg.inner.a"})]),
])
def test_the_importers_own_packages_are_edges_only_when_named(how, circle, tmp_path):
    package = _write(tmp_path, {"pkg/__init__.py": "from .inner.a import x\nversion = 1\n",
                                "pkg/inner/__init__.py": "", "pkg/inner/b.py": "",
                                "pkg/inner/a.py": how + "\nx = 1\n", "pkg/b.py": ""})
    assert circles(import_graph(package)) == circle
