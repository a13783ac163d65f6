"""PyTorch tensor names <-> Flax param paths for the BERT/RoBERTa/BART families.

The HF PyTorch and Flax classes of these families share module paths; only the leaves differ:
a Linear's ``weight (out, in)`` is a Dense ``kernel (in, out)``, an Embedding's ``weight`` is
``embedding``, a LayerNorm's ``weight`` is ``scale`` (old BERT checkpoints say ``gamma`` /
``beta``). `read_checkpoint` reads a safetensors directory (single or sharded, memory-mapped)
into a flat ``{flax path: array}`` dict with those renames; `to_torch` is the inverse for
`aroma_jax.models.native.checkpoint_io.save_safetensors`.

Example:
    >>> to_flax("bert.encoder.layer.0.attention.output.LayerNorm.gamma")
    (('bert', 'encoder', 'layer', '0', 'attention', 'output', 'LayerNorm', 'scale'), False)
    >>> to_flax("model.encoder.layers.1.fc1.weight")
    (('model', 'encoder', 'layers', '1', 'fc1', 'kernel'), True)
    >>> to_torch(("model", "shared", "embedding"))
    ('model.shared.weight', False)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from aroma_jax.models.native.checkpoint_io import SafetensorsFile, checkpoint_files


def _is_norm(module: str) -> bool:
    return module == "LayerNorm" or module.endswith(("layer_norm", "layernorm_embedding"))


def _is_embedding(module: str) -> bool:
    return module.endswith("_embeddings") or module in ("shared", "embed_tokens", "embed_positions")


def to_flax(name: str) -> tuple[tuple[str, ...], bool]:
    """(Flax path, transpose) of a PyTorch tensor name."""
    *mod, leaf = name.split(".")
    owner = mod[-1] if mod else ""
    if leaf in ("gamma", "beta"):  # pre-2019 BERT checkpoints
        leaf = "weight" if leaf == "gamma" else "bias"
    if leaf == "weight":
        if _is_norm(owner):
            return (*mod, "scale"), False
        if _is_embedding(owner):
            return (*mod, "embedding"), False
        return (*mod, "kernel"), True
    return (*mod, leaf), False


def to_torch(path: tuple[str, ...]) -> tuple[str, bool]:
    """The inverse of `to_flax`: (PyTorch name, transpose)."""
    *mod, leaf = path
    if leaf in ("scale", "embedding", "kernel"):
        return ".".join((*mod, "weight")), leaf == "kernel"
    return ".".join(path), False


def read_checkpoint(
    directory: str | Path, rename: Callable[[str], str | None] = lambda n: n
) -> dict[tuple[str, ...], np.ndarray]:
    """Every tensor of a safetensors checkpoint in Flax layout (transposed views of the
    memory-mapped data: nothing is copied until the caller casts). ``rename`` maps a PyTorch
    name first (None: skip the tensor)."""
    out = {}
    files: dict[Path, SafetensorsFile] = {}
    for name, fpath in sorted(checkpoint_files(directory).items()):
        new = rename(name)
        if new is None:
            continue
        reader = files.setdefault(fpath, SafetensorsFile(fpath))
        path, transpose = to_flax(new)
        w = reader.get(name)
        out[path] = w.T if transpose else w
    return out
