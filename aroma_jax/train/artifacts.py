"""The finished run's adapters as a small, framework-neutral artefact (``DIR/final/``).

After `AromaTrainer.finalize` the whole update lives in the frozen factors, so a run's result is
the factors, their merge counts and the trained head, never the (large) base model:

    final/adapters.safetensors   frozen/<path>/a (in, k), frozen/<path>/b (k, out),
                                 merges/<path>, extra/<param path>
                                 magnitude/<path> (DoRA's m), kept/<path> (AdaLoRA's
                                 latest allocation, 0/1 per triplet)
    final/meta.json              scale, r, target paths and kernel shapes, folded paths
                                 (AdaLoRA: its settings, for PEFT's config), class names
    final/integrity.json         each file's size and sha256, the step it was finalized at

The directory is written whole beside its place and renamed into it, and every reader
(`load_final`: eval, export; `aroma_jax.analysis.runs.open_run`) checks it against
``integrity.json`` first (`verify_final`): a missing or damaged file is a `FinalError` naming it
and how to rebuild ``final/`` from the run's last checkpoint (``aroma-jax finalize DIR``).

`rebuild_state` turns it back into a finalized `TrainState` on top of the pretrained base:
folded kernels are recomputed as ``W0 + s * A @ B`` in fp32 (once, at load), the others keep
applying their factors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from aroma_jax.core.adapters import AdapterState, Frozen
from aroma_jax.core.methods.base import factors
from aroma_jax.core.train_step import AromaTrainer, TrainState

FILES = ("adapters.safetensors", "meta.json")
MANIFEST = "integrity.json"


class FinalError(ValueError):
    """A run's ``final/`` is missing or damaged; the message names the file and the remedy."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # directories cannot be fsynced everywhere
        pass
    finally:
        os.close(fd)


def save_final(
    directory: str | Path,
    trainer: AromaTrainer,
    state: TrainState,
    label_names: Sequence[str] = (),
    step: int | None = None,
    best: Mapping[str, Any] | None = None,
) -> Path:
    """Writes the finalized adapters and head atomically: a fresh directory beside ``directory``
    gets every file, their fingerprints (``integrity.json``) and an fsync, then replaces it.

    ``label_names`` (class names in id order) go to meta.json for the exports' ``id2label``;
    ``step`` is the step the state was finalized at; ``best`` (best/ only: the metric, step
    and value it was selected by, `aroma_jax.train.best`) goes to integrity.json.
    """
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash: never mix its files in
    tmp.mkdir(parents=True)
    entries = trainer.unstacked(jax.device_get(state.adapters))  # one layer per entry
    frozen, merges, pairs = entries.frozen, entries.merges, entries.pairs
    extra = jax.device_get(state.extra)
    cfg = trainer.cfg
    tensors = cfg.plugin.save_tensors(trainer, state)  # the method's own, e.g. AdaLoRA's kept
    for p in trainer.paths:
        k = int(merges[p]) * cfg.pair_rank
        if pairs[p].magnitude is not None:
            tensors[f"magnitude/{p}"] = np.asarray(pairs[p].magnitude, np.float32)
        tensors[f"frozen/{p}/a"] = np.ascontiguousarray(np.asarray(frozen[p].a)[:, :k])
        tensors[f"frozen/{p}/b"] = np.ascontiguousarray(np.asarray(frozen[p].b)[:k, :])
        tensors[f"merges/{p}"] = np.asarray(merges[p], np.int32).reshape(1)
    for key, value in traverse_util.flatten_dict(extra, sep="/").items():
        tensors[f"extra/{key}"] = np.asarray(value)
    save_file(tensors, str(tmp / "adapters.safetensors"))
    meta = {
        "scale": trainer.cfg.scale,
        "r": trainer.cfg.r,
        "alpha": trainer.cfg.alpha,
        "method": trainer.cfg.method,
        "adapter_dropout": trainer.cfg.adapter_dropout,
        "paths": list(trainer.paths),
        "kernel_shapes": {p: list(s.kernel_shape) for p, s in trainer.entry_specs.items()},
        "folded": sorted(e for e, (p, _) in trainer.entry_origin.items() if p in trainer.folded),
        "stacked": trainer.stacked,
        "ranks": trainer.ranks(state),
    }
    meta.update(cfg.plugin.save_meta(cfg))
    if label_names:
        meta["label_names"] = list(label_names)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    manifest = {
        "format": 1,
        "step": step,
        **({"best": dict(best)} if best is not None else {}),
        "files": {
            name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
            for name in FILES
        },
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    for name in (*FILES, MANIFEST):
        _fsync(tmp / name)
    _fsync(tmp)
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        directory.replace(old)
        tmp.replace(directory)
        shutil.rmtree(old)
    else:
        tmp.replace(directory)
    _fsync(directory.parent)
    return directory


def _remedy(directory: Path) -> str:
    run = directory.parent
    if directory.name == "best":  # rebuilt from checkpoints-best/ (`aroma_jax.train.best`)
        return f"rebuild best/ from its checkpoint with `aroma-jax finalize {run} --which best`"
    return f"rebuild final/ from the run's last checkpoint with `aroma-jax finalize {run}`"


def verify_final(directory: str | Path) -> dict[str, Any]:
    """Checks ``final/`` against its ``integrity.json``; returns the manifest.

    Raises `FinalError` naming the first missing or damaged file and the remedy. A ``final/``
    written before fingerprints existed (no ``integrity.json``) is checked for readability
    only: its safetensors header and its meta.json must parse.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FinalError(f"{str(directory)!r} is missing: {_remedy(directory)}")
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
        missing = [n for n in FILES if not (directory / n).is_file()]
        if missing:
            raise FinalError(f"{str(directory / missing[0])!r} is missing: {_remedy(directory)}")
        try:
            from safetensors import safe_open

            with safe_open(str(directory / FILES[0]), framework="np") as f:
                f.keys()
        except Exception as err:  # safetensors raises its own error type for a bad header
            raise FinalError(
                f"{str(directory / FILES[0])!r} is damaged ({type(err).__name__}: {err}): "
                f"{_remedy(directory)}"
            ) from None
        _json(directory / FILES[1], directory)
        return {}
    manifest = _json(manifest_path, directory)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or set(files) != set(FILES):
        raise FinalError(f"{str(manifest_path)!r} is damaged (no file list): {_remedy(directory)}")
    for name in FILES:
        path, want = directory / name, files[name]
        if not path.is_file():
            raise FinalError(f"{str(path)!r} is missing: {_remedy(directory)}")
        size = path.stat().st_size
        if size != want.get("bytes") or _sha256(path) != want.get("sha256"):
            what = (
                f"{size} bytes, {want.get('bytes')} written"
                if size != want.get("bytes")
                else ("its sha256 differs from the one written")
            )
            raise FinalError(f"{str(path)!r} is damaged ({what}): {_remedy(directory)}")
    return manifest


def _json(path: Path, directory: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise FinalError(
            f"{str(path)!r} is damaged (not readable JSON: {err}): {_remedy(directory)}"
        ) from None


def load_final(directory: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, meta) of a saved artefact; a clear error if it is missing or incomplete."""
    directory = Path(directory)
    verify_final(directory)
    return load_file(str(directory / FILES[0])), json.loads((directory / FILES[1]).read_text())


def extra_params(tensors: dict[str, np.ndarray]) -> dict:
    flat = {k[len("extra/") :]: v for k, v in tensors.items() if k.startswith("extra/")}
    return traverse_util.unflatten_dict(flat, sep="/") if flat else {}


def rebuild_state(trainer: AromaTrainer, params: Any, directory: str | Path) -> TrainState:
    """A finalized `TrainState` from pretrained ``params`` and a saved artefact."""
    tensors, meta = load_final(directory)
    if sorted(meta["paths"]) != sorted(trainer.paths):
        raise ValueError(
            f"the artefact in {str(directory)!r} adapts {len(meta['paths'])} modules that do not "
            f"match this model's targets ({len(trainer.paths)} modules)"
        )
    state = trainer.init(params)
    base = state.base
    frozen, merges, pairs, done = {}, {}, {}, {}
    fresh_entries = trainer.unstacked(state.adapters)
    cap = fresh_entries.frozen
    ctrl = trainer.cfg.plugin.restore(trainer, tensors, state.ctrl)
    for p in trainer.paths:
        a, b = factors(tensors, p)
        k = a.shape[1]
        fa = np.zeros(cap[p].a.shape, np.float32)
        fb = np.zeros(cap[p].b.shape, np.float32)
        fa[:, :k], fb[:k, :] = a, b
        frozen[p] = Frozen(jnp.asarray(fa), jnp.asarray(fb))
        merges[p] = jnp.asarray(int(tensors[f"merges/{p}"][0]), jnp.int32)
        fresh = fresh_entries.pairs[p]
        pairs[p] = fresh._replace(a=jnp.zeros_like(fresh.a), b=jnp.zeros_like(fresh.b))
        if fresh.magnitude is not None:
            pairs[p] = pairs[p]._replace(magnitude=jnp.asarray(tensors[f"magnitude/{p}"]))
        done[p] = jnp.ones((), bool)
        module, layer = trainer.entry_origin[p]
        if module in trainer.folded and k:
            delta = trainer.cfg.scale * (a.astype(np.float32) @ b.astype(np.float32))
            base = fold_into_kernel(base, module, layer, trainer.entry_specs[p], delta)
    extra = extra_params(tensors)
    if not extra:
        extra = state.extra
    adapters = trainer.restacked(AdapterState(pairs, frozen, merges, done))
    return state._replace(base=base, extra=extra, adapters=adapters, ctrl=ctrl)


def fold_into_kernel(base: dict, module: str, layer: int | None, spec, delta: np.ndarray) -> dict:
    """``base`` with ``delta (in, out)`` added in fp32 to ``module``'s kernel (layer ``layer``
    of a stacked one): what a folded kernel holds after its merges."""
    node = base
    for key in module.split("/"):
        node = node[key]
    kernel = node["kernel"]
    w = np.asarray(kernel if layer is None else kernel[layer], np.float32)
    w = w.reshape(spec.fan_in, spec.fan_out) + delta
    w = jnp.asarray(w.reshape(spec.kernel_shape), kernel.dtype)
    if layer is not None:
        w = jnp.asarray(kernel).at[layer].set(w)
    return _set_kernel(base, module, w)


def _set_kernel(tree: dict, path: str, value) -> dict:
    head, _, rest = path.partition("/")
    out = dict(tree)
    out[head] = _set_kernel(tree[head], rest, value) if rest else {**tree[head], "kernel": value}
    return out


__all__ = [
    "FinalError",
    "extra_params",
    "factors",
    "fold_into_kernel",
    "load_final",
    "rebuild_state",
    "save_final",
    "verify_final",
]
