"""The package's layers point one way: core <- data <- models <- train <- analysis <- cli/demo;
no import cycles; no private name taken from another module.

`core/` (the algorithm) may import jax, flax, optax, numpy and the standard library, and nothing
else of the project. Every import counts, including ones inside functions.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "aroma_jax"
LAYERS = ("core", "data", "models", "train", "analysis")  # each imports only itself and earlier
CORE_EXTERNAL = {"jax", "jaxlib", "flax", "optax", "numpy"}


def imported_modules(source: str, module: str) -> set[str]:
    """Absolute names of every module that ``source`` (the module ``module``) imports."""
    out: set[str] = set()
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            if name in ("aroma_jax", *(f"aroma_jax.{layer}" for layer in LAYERS)):
                out.update(f"{name}.{alias.name}" for alias in node.names)
    return out


def layer_of(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "aroma_jax":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "top"


def violations(source: str, module: str) -> list[str]:
    own = layer_of(module)
    if own == "top":
        return []
    allowed = set(LAYERS[: LAYERS.index(own) + 1])
    bad = []
    for name in sorted(imported_modules(source, module)):
        target = layer_of(name)
        if name == "aroma_jax" or (target is not None and target not in allowed):
            bad.append(f"{module} imports {name}")
        elif own == "core" and target is None:
            root = name.split(".")[0]
            if root not in CORE_EXTERNAL and root not in sys.stdlib_module_names:
                bad.append(f"{module} (core) imports the third-party package {root}")
    return bad


def package_modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1] + ["__init__"]
        yield ".".join(parts), path


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_point_down(layer):
    found = []
    for module, path in package_modules():
        if layer_of(module) == layer:
            found.append(module)
            assert violations(path.read_text(), module) == []
    assert found, f"no modules in aroma_jax/{layer}/"


def test_checker_catches_upward_imports():
    src = (
        "import jax\nfrom aroma_jax.train import runner\n"
        "def f():\n    from aroma_jax.models.hf import PRESETS\n    import transformers\n"
        "from ..data import tasks\nfrom aroma_jax import loop\n"
    )
    bad = violations(src, "aroma_jax.core.x")
    assert "aroma_jax.core.x imports aroma_jax.train.runner" in bad
    assert "aroma_jax.core.x imports aroma_jax.models.hf" in bad
    assert "aroma_jax.core.x imports aroma_jax.data.tasks" in bad
    assert "aroma_jax.core.x imports aroma_jax" in bad  # the top package re-exports everything
    assert any("third-party package transformers" in b for b in bad)
    assert violations("from aroma_jax.core import norms\nimport numpy", "aroma_jax.core.x") == []
    assert violations("from aroma_jax.train import runner", "aroma_jax.models.x") != []
    assert violations("from aroma_jax.data import offline", "aroma_jax.models.x") == []
    assert violations("from aroma_jax.models import hf", "aroma_jax.data.x") != []


def test_public_api_from_the_top():
    import aroma_jax

    for name in ("AromaConfig", "AromaTrainer", "TrainState", "History", "loop", "inject"):
        assert hasattr(aroma_jax, name)


def import_edges(source: str, module: str, modules: set[str]) -> set[str]:
    """The project modules that ``source`` (the module ``module``) imports by name, at any depth
    of its code: ``from P import x`` counts as importing ``P.x`` where that is a module, else ``P``
    (a package's ``__init__``); the parent packages that Python also initialises are left out."""
    out: set[str] = set()
    package = module.rsplit(".", 1)[0]  # for ``pkg.__init__`` too: the package itself

    def node(name: str) -> str | None:
        if name in modules:
            return name
        return f"{name}.__init__" if f"{name}.__init__" in modules else None

    for n in ast.walk(ast.parse(source)):
        if isinstance(n, ast.Import):
            targets = [node(alias.name) for alias in n.names]
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = package.split(".")
                base = base[: len(base) - n.level + 1]
                name = ".".join(base + ([n.module] if n.module else []))
            else:
                name = n.module or ""
            targets = [node(f"{name}.{alias.name}") or node(name) for alias in n.names]
        else:
            continue
        out.update(t for t in targets if t is not None and t != module)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
    return sorted(found)


def private_uses(source: str, module: str, modules: set[str]) -> list[str]:
    """Private names (one leading underscore) that ``module`` takes from another project module:
    ``from m import _x`` and ``m._x`` where ``m`` is an imported project module."""
    bad = []
    bound: dict[str, str] = {}  # local name -> project module it is bound to
    tree = ast.parse(source)
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("aroma_jax"):
            for alias in n.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    bad.append(f"{module} imports {n.module}.{alias.name}")
                full = f"{n.module}.{alias.name}"
                if full in modules or f"{full}.__init__" in modules:
                    bound[alias.asname or alias.name] = full
        elif isinstance(n, ast.Import):
            for alias in n.names:
                if alias.name.startswith("aroma_jax") and alias.asname:
                    bound[alias.asname] = alias.name
    for n in ast.walk(tree):
        if (
            isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name)
            and n.value.id in bound
            and n.attr.startswith("_")
            and not n.attr.startswith("__")
        ):
            bad.append(f"{module} uses {bound[n.value.id]}.{n.attr}")
    return bad


def project_graph() -> tuple[dict[str, set[str]], dict[str, str]]:
    sources = {module: path.read_text() for module, path in package_modules()}
    modules = set(sources)
    return {m: import_edges(s, m, modules) for m, s in sources.items()}, sources


def test_no_import_cycles():
    graph, _ = project_graph()
    assert cycles(graph) == []


def test_no_private_names_from_other_modules():
    _, sources = project_graph()
    modules = set(sources)
    found = {b for m, s in sources.items() for b in private_uses(s, m, modules)}
    assert found == set()


def test_checkers_catch_a_cycle_and_a_private_name():
    modules = {"aroma_jax.a", "aroma_jax.b", "aroma_jax.c", "aroma_jax.p.__init__", "aroma_jax.p.q"}
    graph = {
        "aroma_jax.a": import_edges(
            "def f():\n    from aroma_jax import b\n", "aroma_jax.a", modules
        ),
        "aroma_jax.b": import_edges("import aroma_jax.c\n", "aroma_jax.b", modules),
        "aroma_jax.c": import_edges(
            "from . import a\nfrom aroma_jax.p import X\n", "aroma_jax.c", modules
        ),
        "aroma_jax.p.q": import_edges("from .. import p\n", "aroma_jax.p.q", modules),
    }
    assert graph["aroma_jax.c"] == {"aroma_jax.a", "aroma_jax.p.__init__"}
    assert graph["aroma_jax.p.q"] == {"aroma_jax.p.__init__"}
    assert cycles(graph) == [["aroma_jax.a", "aroma_jax.b", "aroma_jax.c"]]
    assert cycles({"aroma_jax.a": {"aroma_jax.b"}, "aroma_jax.b": set()}) == []
    src = "from aroma_jax.p import q as qq, _hidden\nqq._helper()\nqq.public()\nx._y\n"
    assert private_uses(src, "aroma_jax.a", modules) == [
        "aroma_jax.a imports aroma_jax.p._hidden",
        "aroma_jax.a uses aroma_jax.p.q._helper",
    ]


def test_experiments_is_a_package_without_path_edits():
    """The lab scripts import each other as ``experiments.<name>``, never by editing
    ``sys.path`` (run them as ``python -m experiments.<name>``)."""
    lab = PKG.parent / "experiments"
    assert (lab / "__init__.py").is_file()
    edits = [
        f"{path.name}:{n.lineno}"
        for path in sorted(lab.rglob("*.py"))
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Attribute)
        and n.attr == "path"
        and isinstance(n.value, ast.Name)
        and n.value.id == "sys"
    ]
    assert edits == []
