"""The finished run's adapters as a small, framework-neutral artefact (``DIR/final/``).

After `AromaTrainer.finalize` the whole update lives in the frozen factors, so a run's result is
the factors, their merge counts and the trained head, never the (large) base model:

    final/adapters.safetensors   frozen/<path>/a (in, k), frozen/<path>/b (k, out),
                                 merges/<path>, extra/<param path>
                                 magnitude/<path> (DoRA's m), kept/<path> (AdaLoRA's
                                 latest allocation, 0/1 per triplet)
    final/meta.json              scale, r, target paths and kernel shapes, folded paths
                                 (AdaLoRA: its settings, for PEFT's config)

`rebuild_state` turns it back into a finalized `TrainState` on top of the pretrained base:
folded kernels are recomputed as ``W0 + s * A @ B`` in fp32 (once, at load), the others keep
applying their factors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from aroma_jax.core.adapters import AdapterState, Frozen
from aroma_jax.core.train_step import AromaTrainer, TrainState


def save_final(directory: str | Path, trainer: AromaTrainer, state: TrainState) -> Path:
    """Writes the finalized adapters and head atomically (tmp dir, then rename)."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    entries = trainer.unstacked(jax.device_get(state.adapters))  # one layer per entry
    frozen, merges, pairs = entries.frozen, entries.merges, entries.pairs
    extra = jax.device_get(state.extra)
    cfg = trainer.cfg
    tensors: dict[str, np.ndarray] = {}
    kept = None
    if cfg.method == "adalora":  # per entry: a stacked module's row for each layer
        kept = trainer.per_entry(jax.device_get(state.ctrl.method_state.kept))
    for p in trainer.paths:
        k = int(merges[p]) * cfg.pair_rank
        if pairs[p].magnitude is not None:
            tensors[f"magnitude/{p}"] = np.asarray(pairs[p].magnitude, np.float32)
        if kept is not None:
            tensors[f"kept/{p}"] = np.asarray(kept[p], np.uint8)
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
    if cfg.method == "adalora":
        meta["adalora"] = {
            name: getattr(cfg, name)
            for name in ("init_r", "target_r", "tinit", "tfinal", "delta_t", "ipt_beta1")
            + ("ipt_beta2", "orth_reg_weight", "max_steps")
        }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        directory.replace(old)
        tmp.replace(directory)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        tmp.replace(directory)
    return directory


def load_final(directory: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, meta) of a saved artefact; a clear error if it is missing or incomplete."""
    directory = Path(directory)
    files = [directory / "adapters.safetensors", directory / "meta.json"]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(
            f"no finished adapters in {str(directory)!r} (missing {missing}); a run writes them "
            "when training finishes — resume an interrupted run with `aroma-jax train ... --resume`"
        )
    return load_file(str(files[0])), json.loads(files[1].read_text())


def factors(tensors: dict[str, np.ndarray], path: str) -> tuple[np.ndarray, np.ndarray]:
    """The exact merged factors ``(A (in, k), B (k, out))`` of one module."""
    return tensors[f"frozen/{path}/a"], tensors[f"frozen/{path}/b"]


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
    ctrl = state.ctrl
    if trainer.cfg.method == "adalora":
        kept = {}
        for module in trainer.module_paths:
            rows = [tensors[f"kept/{e}"].astype(bool) for e in trainer.specs[module].entries]
            kept[module] = jnp.asarray(np.stack(rows) if trainer.specs[module].stack else rows[0])
        ctrl = ctrl._replace(method_state=ctrl.method_state._replace(kept=kept))
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
    "extra_params",
    "factors",
    "fold_into_kernel",
    "load_final",
    "rebuild_state",
    "save_final",
]
