"""The package's layers: each subpackage imports only from itself and the layers to its left,

    ops -> nn -> data -> training -> inference -> deploy -> cli

read from every module's source with ``ast``: module-level and function-local imports, absolute
and relative. The top-level ``deepatlas_fast/__init__.py`` re-exports the ops only; the other
top-level modules, ``errors`` and ``devices``, import nothing of the package but ``errors``, so
that every layer may raise its errors and check its devices. No two modules import each other, directly or through others."""
import ast
from pathlib import Path

import pytest

PKG = "deepatlas_fast"
LAYERS = ("ops", "nn", "data", "training", "inference", "deploy", "cli")
SRC = Path(__file__).resolve().parents[1] / "src" / PKG
# top-level modules besides the package itself; _C is the compiled extension
TOP_LEVEL = {f"{PKG}.errors", f"{PKG}.devices", f"{PKG}._C"}


def package_modules(root: Path = SRC) -> dict:
    """Dotted module name -> (path, is_package) for every .py file of the package."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = (PKG,) + path.relative_to(root).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def imported_modules(source: str, module: str, is_package: bool, known) -> list:
    """(line, module) for each import of the package in ``source``, anywhere in the file.

    ``from X import name`` counts as an import of ``X.name`` when that is a module of the
    package (``known``), else of ``X``."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level - 1 > len(base) - 1:
                    raise ValueError(f"{module}:{node.lineno}: relative import beyond the package")
                base = base[:len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((node.lineno, sub if sub in known else base))
    return [(line, m) for line, m in found if m == PKG or m.startswith(PKG + ".")]


def layer_of(module: str):
    """Index in LAYERS; -1 for the package itself and its top-level modules (below every layer);
    None for a module that belongs to no layer."""
    parts = module.split(".")
    if module == PKG or module in TOP_LEVEL:
        return -1
    if len(parts) > 1 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return None


def violations(source: str, module: str, is_package: bool = False, known=()) -> list:
    """Imports in ``source`` (the text of ``module``) that break the layering, as messages."""
    out = []
    here = layer_of(module)
    for line, target in imported_modules(source, module, is_package, set(known)):
        there = layer_of(target)
        if there is None:
            out.append(f"{module}:{line} imports {target}, which belongs to no layer")
        elif module == PKG:
            if not (target == f"{PKG}.ops" or target.startswith(f"{PKG}.ops.")):
                out.append(f"{module}:{line} imports {target}: the top-level package re-exports the ops only")
        elif module in TOP_LEVEL and (target != f"{PKG}.errors" or module == f"{PKG}.errors"):
            out.append(f"{module}:{line} imports {target}: {module} must import nothing of the package but errors")
        elif here is not None and there > here:
            out.append(f"{module}:{line} ({LAYERS[here]}) imports {target} ({LAYERS[there]}), a layer to its right")
    return out


# ---------------------------------------------------------------------------------------------
def test_every_module_belongs_to_a_layer():
    modules = package_modules()
    assert f"{PKG}.ops.warp" in modules and f"{PKG}.cli" in modules
    assert [m for m in modules if layer_of(m) is None] == []
    assert [m for m in modules if m.count(".") == 1 and m.split(".")[1] not in LAYERS
            and m not in TOP_LEVEL] == []


def test_no_module_imports_from_a_layer_to_its_right():
    modules = package_modules()
    known = set(modules) | TOP_LEVEL
    bad = []
    for name, (path, is_package) in modules.items():
        bad += violations(path.read_text(), name, is_package, known)
    assert bad == []


def test_no_import_cycles():
    modules = package_modules()
    known = set(modules) | TOP_LEVEL
    graph = {name: {m for _, m in imported_modules(path.read_text(), name, is_package, known) if m != name}
             for name, (path, is_package) in modules.items()}
    cycles = [c for c in strongly_connected(graph) if len(c) > 1]
    assert cycles == []


def strongly_connected(graph: dict) -> list:
    """Tarjan's strongly connected components of ``graph`` (node -> set of nodes)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
            out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


# ---------------------------------------------------------------------------------------------
# the checker itself, on synthetic sources
KNOWN = {f"{PKG}.{m}" for m in ("ops", "ops.warp", "nn", "nn.nets", "data", "data.io", "training",
                                 "training.trainer", "inference", "inference.run", "cli", "errors")}


@pytest.mark.parametrize("source", [
    "from ..inference.run import load_run\n",                        # relative, module level
    "def f():\n    from ..inference import run\n",                   # relative, function-local
    "def f():\n    import deepatlas_fast.inference.run\n",           # absolute
    "from deepatlas_fast import cli\n",                              # a subpackage by name
    "from .. import cli\n",
])
def test_checker_finds_an_import_to_the_right(source):
    bad = violations(source, f"{PKG}.training.trainer", known=KNOWN)
    assert len(bad) == 1 and "a layer to its right" in bad[0]


@pytest.mark.parametrize("source", [
    "from ..data.io import load_nifti\nfrom ..nn.nets import build_nets\nfrom ..ops import warp\n",
    "from . import trainer\nfrom .. import __version__\nfrom ..errors import DeepAtlasError\n",
    "import torch\nimport numpy as np\nfrom torch import nn\n",
    "def f():\n    from deepatlas_fast.data import io\n",
])
def test_checker_accepts_imports_to_the_left(source):
    assert violations(source, f"{PKG}.training.trainer", known=KNOWN) == []


def test_checker_rules_for_top_level_modules():
    assert violations("from .ops import warp\n", PKG, is_package=True, known=KNOWN) == []
    assert len(violations("from .nn.nets import RegNet\n", PKG, is_package=True, known=KNOWN)) == 1
    assert len(violations("from .ops import warp\n", f"{PKG}.errors", known=KNOWN)) == 1
    assert len(violations("from ..misc import x\n", f"{PKG}.data.io", known=KNOWN)) == 1  # no layer
    assert imported_modules("from .. import _C\n", f"{PKG}.ops._library", False, KNOWN | {f"{PKG}._C"}) \
        == [(1, f"{PKG}._C")]


def test_cycle_finder():
    assert [c for c in strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) if len(c) > 1] \
        == [["a", "b", "c"]]
    assert [c for c in strongly_connected({"a": {"b"}, "b": set()}) if len(c) > 1] == []
