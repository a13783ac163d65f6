"""The package's layers point one way: core <- data <- models <- train <- analysis <- cli/demo.

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
