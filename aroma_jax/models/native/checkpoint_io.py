"""HF safetensors checkpoints <-> the native param tree, with numpy only (no torch).

* `SafetensorsFile` reads a ``.safetensors`` header and memory-maps each tensor on request, so a
  sharded 8B/70B checkpoint is read leaf by leaf: a leaf is cast (``param_dtype``), transposed
  where needed, placed (optionally with a per-leaf sharding) and the mapped pages are released
  before the next one. BF16 goes through ``ml_dtypes`` (numpy has no bfloat16).
* `checkpoint_files` understands ``model.safetensors`` and sharded
  ``model.safetensors.index.json`` directories.
* Names: ``model.layers.3.self_attn.q_proj.weight (out, in)`` ->
  ``model/layers/3/self_attn/q_proj/kernel (in, out)``; norms keep ``weight``; the embedding
  becomes ``embedding``. A tied model's ``lm_head.weight``, if stored, is skipped.
* `save_safetensors` writes the reverse mapping: a directory PyTorch transformers loads.

Example:
    >>> torch_to_flax("model.layers.0.mlp.up_proj.weight")
    (('model', 'layers', '0', 'mlp', 'up_proj', 'kernel'), True)
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
SKIP_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry


class CheckpointError(ValueError):
    """A checkpoint the native loader cannot read; the message names the file or tensor."""


class SafetensorsFile:
    """Lazy reader of one ``.safetensors`` file (header parsed once, tensors memory-mapped)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.header: dict[str, dict] = header
        self.offset = 8 + n

    def keys(self) -> list[str]:
        return list(self.header)

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped numpy array."""
        info = self.header[name]
        if info["dtype"] not in DTYPES:
            raise CheckpointError(
                f"{self.path.name}: tensor {name!r} has dtype {info['dtype']!r}: accepted "
                f"{sorted(DTYPES)}"
            )
        start, end = info["data_offsets"]
        dtype = np.dtype(DTYPES[info["dtype"]])
        shape = tuple(info["shape"])
        if end - start == 0:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self.offset + start, shape=shape)


def checkpoint_files(directory: str | Path) -> dict[str, Path]:
    """Tensor name -> file holding it, from an index (sharded) or a single file."""
    d = Path(directory)
    index = d / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: d / fname for name, fname in weight_map.items()}
    single = d / "model.safetensors"
    if single.exists():
        return {name: single for name in SafetensorsFile(single).keys()}
    raise FileNotFoundError(
        f"no model.safetensors or model.safetensors.index.json in {str(d)!r} "
        "(PyTorch .bin checkpoints need torch: convert them to safetensors first)"
    )


def torch_to_flax(name: str) -> tuple[tuple[str, ...], bool] | None:
    """(flax path, transpose) for an HF tensor name, or None for buffers to skip."""
    if name.endswith(SKIP_SUFFIXES):
        return None
    parts = name.split(".")
    leaf = parts[-1]
    if parts[-2] == "embed_tokens" and leaf == "weight":
        return (*parts[:-1], "embedding"), False
    if parts[-2].endswith("_proj") or parts[-2] == "lm_head":
        if leaf == "weight":
            return (*parts[:-1], "kernel"), True
        return (*parts[:-1], "bias"), False
    if parts[-2].endswith("norm") and leaf == "weight":
        return tuple(parts), False
    raise CheckpointError(f"unexpected tensor {name!r}: not a LLaMA-family weight")


def flax_to_torch(path: tuple[str, ...]) -> tuple[str, bool]:
    """The inverse of `torch_to_flax`: (HF tensor name, transpose)."""
    *mod, leaf = path
    if leaf == "embedding":
        return ".".join(mod) + ".weight", False
    if leaf == "kernel":
        return ".".join(mod) + ".weight", True
    return ".".join(path), False


def iter_tensors(directory: str | Path, tied: bool) -> Iterator[tuple[tuple[str, ...], Callable]]:
    """(flax path, loader) per tensor; each loader returns the leaf in Flax layout, lazily."""
    files: dict[Path, SafetensorsFile] = {}
    for name, fpath in sorted(checkpoint_files(directory).items()):
        mapped = torch_to_flax(name)
        if mapped is None or (tied and name.startswith("lm_head.")):
            continue
        path, transpose = mapped
        reader = files.setdefault(fpath, SafetensorsFile(fpath))

        def load(reader=reader, name=name, transpose=transpose):
            w = reader.get(name)
            return w.T if transpose else w

        yield path, load


def load_params(
    directory: str | Path,
    tied: bool,
    param_dtype: Any = np.float32,
    sharding_for: Callable[[str, tuple[int, ...]], Any] | None = None,
) -> dict:
    """The nested param tree, read, cast and placed one leaf at a time.

    ``sharding_for(path, shape)`` may return a `jax.sharding.Sharding` per leaf ("/"-joined
    path), so each leaf goes straight to its shards and the host never holds the whole model.
    """
    flat = {}
    dtype = np.dtype(param_dtype)
    for path, load in iter_tensors(directory, tied):
        w = np.ascontiguousarray(load().astype(dtype))
        sharding = sharding_for("/".join(path), w.shape) if sharding_for else None
        flat[path] = jax.device_put(w, sharding) if sharding is not None else jax.device_put(w)
        del w
    if not flat:
        raise CheckpointError(f"no tensors read from {str(directory)!r}")
    return traverse_util.unflatten_dict(flat)


def save_safetensors(params: Mapping, path: str | Path, metadata: dict | None = None) -> Path:
    """Writes ``params`` (Flax layout) as one HF ``model.safetensors`` (PyTorch layout)."""
    flat = traverse_util.flatten_dict(jax.device_get(dict(params)))
    tensors = {}
    for key, value in flat.items():
        name, transpose = flax_to_torch(tuple(str(k) for k in key))
        arr = np.asarray(value)
        tensors[name] = np.ascontiguousarray(arr.T if transpose else arr)
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name in sorted(tensors):
        arr = tensors[name]
        header[name] = {
            "dtype": NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    path = Path(path)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in sorted(tensors):
            f.write(tensors[name].tobytes())
    return path
