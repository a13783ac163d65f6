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
* Scanned layout (``scan_layers``): `load_params` stacks each layer leaf across layers into
  ``model/layers/<sub-path> (L, ...)``, one stacked leaf at a time (with a sharding, each
  device's shard is read straight from the memory-mapped files); `save_safetensors` writes
  per-layer names (``model.layers.<i>....``) from either layout.

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

from aroma_jax.models.native.modeling import LAYERS_PATH, is_scanned, unstack_layers

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
        need = self.offset + max((t["data_offsets"][1] for t in header.values()), default=0)
        have = self.path.stat().st_size
        if have < need:
            raise CheckpointError(
                f"{self.path.name} is truncated: its header promises {need} bytes, the file "
                f"holds {have} (re-copy or re-fetch it)"
            )

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


def layer_index(path: tuple[str, ...]) -> int | None:
    """The layer of an unrolled layer leaf (``model/layers/<i>/...``), else None."""
    n = len(LAYERS_PATH)
    if len(path) > n + 1 and tuple(path[:n]) == LAYERS_PATH and path[n].isdigit():
        return int(path[n])
    return None


def read(mapped: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A host copy of a memory-mapped tensor (or a slice of one), cast to ``dtype``: the one
    place a sharded load copies weights out of the files (tests count its bytes)."""
    return np.array(mapped, dtype=dtype)


def _from_shards(shape: tuple[int, ...], sharding, shard: Callable) -> jax.Array:
    """`jax.make_array_from_callback` that reads each distinct index once per process (the
    devices holding a replica of it share the copy), and only this process's indices."""
    copies: dict[tuple, np.ndarray] = {}

    def once(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in copies:
            copies[key] = shard(index)
        return copies[key]

    return jax.make_array_from_callback(shape, sharding, once)


def _leaf(path: tuple[str, ...], load: Callable, dtype: np.dtype, sharding_for) -> jax.Array:
    """One unrolled leaf: whole (no sharding), or only this process's shards of it."""
    mapped = load()  # memory-mapped: no data read yet
    sharding = sharding_for("/".join(path), mapped.shape) if sharding_for else None
    if sharding is None:
        return jax.device_put(np.ascontiguousarray(mapped.astype(dtype)))
    return _from_shards(mapped.shape, sharding, lambda index: read(mapped[index], dtype))


def _stacked_leaf(
    path: tuple[str, ...], loads: Mapping[int, Callable], dtype: np.dtype, sharding_for
) -> jax.Array:
    """One scanned leaf ``(L, ...)`` from the per-layer loaders ``{i: load}``.

    Without a sharding the host fills one ``(L, ...)`` buffer (cast on assignment) and places
    it; with one, every device's shard is read and cast from the memory-mapped layers directly
    (`jax.make_array_from_callback`), so the whole stacked leaf never sits on the host.
    """
    n = len(loads)
    if sorted(loads) != list(range(n)):
        raise CheckpointError(
            f"{'/'.join(path)}: layers {sorted(loads)} in the checkpoint: expected 0..{n - 1}"
        )
    shape = loads[0]().shape  # memory-mapped: reading the shape reads no data
    for i in range(n):
        if loads[i]().shape != shape:
            raise CheckpointError(
                f"{'/'.join(path)}: layer {i} has shape {loads[i]().shape}, layer 0 {shape}"
            )
    full = (n, *shape)
    sharding = sharding_for("/".join(path), full) if sharding_for else None
    if sharding is None:
        out = np.empty(full, dtype)
        for i in range(n):
            out[i] = loads[i]()  # cast while copying out of the mapped file
        return jax.device_put(out)

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        layers = range(n)[index[0]]
        rest = tuple(index[1:])
        return np.stack([read(loads[i]()[rest], dtype) for i in layers])

    return _from_shards(full, sharding, shard)


def load_params(
    directory: str | Path,
    tied: bool,
    param_dtype: Any = np.float32,
    sharding_for: Callable[[str, tuple[int, ...]], Any] | None = None,
    scan_layers: bool = False,
) -> dict:
    """The nested param tree, read, cast and placed one leaf at a time.

    ``sharding_for(path, shape)`` may return a `jax.sharding.Sharding` per leaf ("/"-joined
    path, e.g. `aroma_jax.core.sharding.sharding_for`), so each leaf goes straight to its
    shards and the host never holds the whole model; on several processes each one reads only
    the slices its own devices hold.
    ``scan_layers=True`` returns the scanned layout (`aroma_jax.models.native.stack_layers`):
    ``sharding_for`` then sees the stacked paths and shapes (``model/layers/self_attn/q_proj/
    kernel``, ``(L, in, out)``), and each stacked leaf is built on its own (`_stacked_leaf`).
    """
    flat = {}
    stacked: dict[tuple[str, ...], dict[int, Callable]] = {}
    dtype = np.dtype(param_dtype)
    n = len(LAYERS_PATH)
    for path, load in iter_tensors(directory, tied):
        layer = layer_index(path) if scan_layers else None
        if layer is not None:
            stacked.setdefault((*path[:n], *path[n + 1 :]), {})[layer] = load
            continue
        flat[path] = _leaf(path, load, dtype, sharding_for)
    counts = {len(loads) for loads in stacked.values()}
    if len(counts) > 1:
        raise CheckpointError(f"layer leaves of {str(directory)!r} disagree on the layer count")
    for path, loads in stacked.items():
        flat[path] = _stacked_leaf(path, loads, dtype, sharding_for)
    if not flat:
        raise CheckpointError(f"no tensors read from {str(directory)!r}")
    return traverse_util.unflatten_dict(flat)


def save_safetensors(
    params: Mapping,
    path: str | Path,
    metadata: dict | None = None,
    to_torch: Callable[[tuple[str, ...]], tuple[str, bool]] = flax_to_torch,
    layers_at: tuple[tuple[str, ...], ...] = (LAYERS_PATH,),
) -> Path:
    """Writes ``params`` (Flax layout) as one HF ``model.safetensors`` (PyTorch layout).

    A scanned tree (``model/layers/<sub-path> (L, ...)``, or any stack in ``layers_at``) is
    written under per-layer names (``model.layers.<i>....``), exactly as its unrolled twin.
    ``to_torch`` names each leaf (default: the LLaMA family's `flax_to_torch`).
    """
    host = jax.device_get(dict(params))
    for at in layers_at:
        if is_scanned(host, at):
            host = unstack_layers(host, at)  # numpy views: no copy
    flat = traverse_util.flatten_dict(host)
    tensors = {}
    for key, value in flat.items():
        name, transpose = to_torch(tuple(str(k) for k in key))
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
