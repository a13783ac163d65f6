"""The run configs that ship with the package: the demo's, the tiny test models' and the paper's
presets (``paper/<family>/<row>.yaml``, with ``paper/paper_numbers.yaml``, the paper's tables).

They are package data, so an installed ``aroma-jax`` finds them without a source checkout:

    aroma-jax train --config demo-aroma --output runs/x
    aroma-jax train --config paper/glue/aroma-mrpc.yaml --output runs/y

`resolve` turns what a user typed into a file: an existing path first, then a shipped config by
name (with or without ``.yaml``). The source tree's old locations, ``experiments/configs/<name>``
and ``experiments/paper/<path>``, name the same shipped files, so commands written before the
configs moved keep working.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

# Where the shipped configs lived in the source tree before they became package data.
LEGACY_PREFIXES = {"experiments/configs/": "", "experiments/paper/": "paper/"}


def root() -> Path:
    """The directory holding the shipped configs (a real directory: wheels install unzipped)."""
    return Path(str(resources.files(__name__)))


def names() -> list[str]:
    """Every shipped run config, relative to `root` (``demo-aroma.yaml``, ``paper/glue/...``)."""
    base = root()
    return sorted(
        p.relative_to(base).as_posix()
        for p in base.rglob("*.yaml")
        if p.name != "paper_numbers.yaml"
    )


def _shipped_summary() -> str:
    """The shipped configs in one line: the top-level ones by name, the paper's by family."""
    top = [n.removesuffix(".yaml") for n in names() if "/" not in n]
    families = sorted({n.split("/")[1] for n in names() if n.startswith("paper/")})
    paper = sum(n.startswith("paper/") for n in names())
    return f"{', '.join(top)}, or paper/<{'|'.join(families)}>/<row>.yaml ({paper} presets)"


def config_path(name: str) -> Path:
    """The shipped config ``name`` (``demo-aroma``, ``demo-aroma.yaml``, ``paper/glue/x.yaml``,
    or its old source-tree path); `FileNotFoundError` naming the shipped ones otherwise."""
    rel = name.replace("\\", "/")
    for old, new in LEGACY_PREFIXES.items():
        at = rel.find(old)
        if at != -1 and (at == 0 or rel[at - 1] == "/"):
            rel = new + rel[at + len(old) :]
            break
    if not rel.endswith((".yaml", ".yml")):
        rel += ".yaml"
    path = root() / rel
    if not path.is_file():
        raise FileNotFoundError(
            f"config file {name!r} does not exist and is not a shipped config: accepted a YAML "
            f"file path or {_shipped_summary()}"
        )
    return path


def resolve(path: str | Path) -> Path:
    """A ``--config`` argument as a file: the path itself if it exists, else the shipped config
    of that name (see `config_path`)."""
    p = Path(path)
    if p.is_file():
        return p
    return config_path(str(path))
