"""PEFT LoRA adapters in: an ``adapter_config.json`` + ``adapter_model.safetensors`` directory
(PyTorch PEFT's format, or our own `aroma_jax.train.export` output) loaded into a `TrainState`.

* `read_adapter` reads the directory: per adapted module (PyTorch name, e.g.
  ``model.layers.0.self_attn.q_proj``) its ``lora_A (r, in)``, ``lora_B (out, r)`` and PEFT's
  scale, ``alpha / r`` or ``alpha / sqrt(r)`` with ``use_rslora``, ``r`` and ``alpha`` resolved
  per module through ``rank_pattern`` / ``alpha_pattern`` exactly as PEFT does (a pattern key
  matches a module name ending in ``.<key>``, as a regex); plus the ``modules_to_save``
  tensors under their plain names.
* `load_adapter` writes it into a fresh state through the run's method
  (`aroma_jax.core.methods.base.Method.import_lora`), given ``A = lora_A^T * scale_peft / s``,
  ``B = lora_B^T`` (``s`` the run's scale). AROMA and ReLoRA take it as *frozen merged
  factors* (``ceil(r / run r)`` slots counted as merges, so the rank starts at the adapter's)
  and grow new rank on top; folded (fp32) kernels also get ``s * A @ B`` added, as
  `aroma_jax.train.artifacts.rebuild_state` does. LoRA takes it as the *trainable pair* (same
  rank as ``aroma.r`` required) and continues training it. A plug-in method inherits its base
  method's import, or defines its own. ``modules_to_save`` tensors replace the matching
  trained head (``extra``) or base params.
* Refused with a one-line error: DoRA (``use_dora``: its magnitude is a per-column rescaling of
  the merged weight, not factors; accepted ``use_dora: false``), other ``peft_type`` values,
  ``lora_bias`` and ``fan_in_fan_out``; a module the model does not have, a module that is not
  a target of the run, a shape that does not fit its kernel (module and both shapes named),
  ``target_modules`` that match nothing, and methods without an import (DoRA, AdaLoRA, head).

Example:
    >>> # state = trainer.init(params)
    >>> # state = load_adapter(trainer, state, "path/to/peft_adapter")
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file

from aroma_jax.core import adapters as adapters_lib
from aroma_jax.core import methods
from aroma_jax.core.adapters import AdapterState
from aroma_jax.core.methods.base import ImportRefused, imports_lora
from aroma_jax.core.train_step import AromaTrainer, TrainState
from aroma_jax.train import artifacts

PREFIX = "base_model.model."


class PeftImportError(ValueError):
    """An adapter that cannot be loaded into this model or run; the message says why."""


@dataclasses.dataclass
class PeftAdapter:
    """A PEFT LoRA adapter read from disk (PyTorch layout and names)."""

    config: dict
    # PyTorch module name -> (lora_A (r, in), lora_B (out, r), PEFT's scale for that module)
    modules: dict[str, tuple[np.ndarray, np.ndarray, float]]
    saved: dict[str, np.ndarray]  # modules_to_save tensors: PyTorch param name -> value
    directory: Path

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")


def pattern_key(keys, name: str) -> str | None:
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern``: the first key ``k`` with
    ``re.match(rf"(.*\\.)?({k})$", name)``."""
    for k in keys:
        if re.match(rf"(.*\.)?({k})$", name):
            return k
    return None


def read_adapter(directory: str | Path) -> PeftAdapter:
    """Reads and checks a PEFT LoRA adapter directory (see the module docstring)."""
    d = Path(directory)
    cfg_file, st_file = d / "adapter_config.json", d / "adapter_model.safetensors"
    missing = [f.name for f in (cfg_file, st_file) if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{str(d)!r} is not a PEFT adapter directory (missing {missing}): accepted a "
            "directory with adapter_config.json and adapter_model.safetensors"
        )
    config = json.loads(cfg_file.read_text())
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise PeftImportError(f"{d}: peft_type {kind!r} is not supported: accepted 'LORA'")
    if config.get("use_dora"):
        raise PeftImportError(
            f"{d}: use_dora adapters are not imported (DoRA rescales each column of the merged "
            "weight; it is not a pair of factors): accepted use_dora false"
        )
    for key in ("lora_bias", "fan_in_fan_out"):
        if config.get(key):
            raise PeftImportError(f"{d}: {key}={config[key]!r} is not supported: accepted false")
    tensors = load_file(str(st_file))
    r0, alpha0 = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    modules: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    saved: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", name)
        if m is None:
            if "lora_" in name:
                raise PeftImportError(
                    f"{d}: tensor {key!r} is not a LoRA factor: accepted "
                    "<module>.lora_A.weight and <module>.lora_B.weight"
                )
            saved[name] = value
            continue
        module = m.group(1)
        other = f"{PREFIX}{module}.lora_{'B' if m.group(2) == 'A' else 'A'}.weight"
        if other not in tensors:
            raise PeftImportError(f"{d}: {module!r} has lora_{m.group(2)} but no {other!r}")
        if m.group(2) == "B":
            continue
        a, b = value, tensors[other]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise PeftImportError(
                f"{d}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
                "form a pair: accepted lora_A (r, in), lora_B (out, r)"
            )
        rk, ak = pattern_key(rank_pattern, module), pattern_key(alpha_pattern, module)
        r = int(rank_pattern[rk]) if rk is not None else r0
        alpha = float(alpha_pattern[ak]) if ak is not None else alpha0
        if r != a.shape[0]:
            raise PeftImportError(
                f"{d}: {module}: lora_A {tuple(a.shape)} has rank {a.shape[0]}, the config says "
                f"r={r} (rank_pattern / r)"
            )
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        modules[module] = (np.asarray(a, np.float32), np.asarray(b, np.float32), scale)
    if not modules:
        raise PeftImportError(f"{d}: no lora_A/lora_B tensors in adapter_model.safetensors")
    return PeftAdapter(config, modules, saved, d)


def _torch_name(path: str) -> str:
    return path.replace("/", ".")


def _check_targets(adapter: PeftAdapter, names: list[str]) -> None:
    """Each ``target_modules`` entry matches some module of this model (PEFT's rule: a name
    equal to or ending in ``.<entry>``; a string is a regex, full match)."""
    targets = adapter.config.get("target_modules")
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, n) for n in names):
            raise PeftImportError(
                f"adapter target_modules {targets!r} matches no module of this model "
                f"(e.g. {names[:3]})"
            )
        return
    for t in targets or []:
        if not any(n == t or n.endswith("." + t) for n in names):
            raise PeftImportError(
                f"adapter target_modules entry {t!r} matches no module of this model "
                f"(e.g. {names[:3]}); was the adapter trained on another base model "
                f"({adapter.base_model!r})?"
            )


def load_adapter(
    trainer: AromaTrainer,
    state: TrainState,
    source: str | Path | PeftAdapter,
    torch_name: Callable[[str], str] = _torch_name,
) -> TrainState:
    """``state`` (fresh, from ``trainer.init``) with the PEFT adapter loaded (module
    docstring). ``torch_name`` maps a Flax module path to its PyTorch name."""
    adapter = source if isinstance(source, PeftAdapter) else read_adapter(source)
    cfg = trainer.cfg
    method = cfg.plugin
    if not imports_lora(method):
        accepted = tuple(n for n in methods.names() if imports_lora(methods.get(n)))
        raise PeftImportError(
            f"an imported PEFT adapter continues with aroma.method in {accepted} (or a method "
            f"that defines Method.import_lora), not {cfg.method!r}"
        )
    every = adapters_lib.find_targets(state.base, (".*",), stacked=trainer.stacked)
    model_specs = adapters_lib.entry_specs(every)
    by_name = {torch_name(e): e for e in model_specs}
    _check_targets(adapter, sorted(by_name))
    targets = {torch_name(e): e for e in trainer.paths}
    entries = trainer.unstacked(state.adapters)
    pairs, frozen, merges = dict(entries.pairs), dict(entries.frozen), dict(entries.merges)
    base = state.base
    for name, (a_pt, b_pt, scale) in sorted(adapter.modules.items()):
        if name not in by_name:
            raise PeftImportError(
                f"adapter module {name!r} (lora_A {a_pt.shape}, lora_B {b_pt.shape}) does not "
                f"exist in this model; was the adapter trained on another base model "
                f"({adapter.base_model!r})?"
            )
        entry = by_name[name]
        spec = model_specs[entry]
        want_a, want_b = (a_pt.shape[0], spec.fan_in), (spec.fan_out, a_pt.shape[0])
        if a_pt.shape != want_a or b_pt.shape != want_b:
            raise PeftImportError(
                f"adapter module {name!r}: lora_A {a_pt.shape} / lora_B {b_pt.shape} do not fit "
                f"this model's kernel (in {spec.fan_in}, out {spec.fan_out}): expected lora_A "
                f"{want_a} / lora_B {want_b}; another base model ({adapter.base_model!r})?"
            )
        if name not in targets:
            raise PeftImportError(
                f"adapter module {name!r} is not a target of this run: add it to "
                f"aroma.target_modules (now {list(cfg.target_modules)})"
            )
        a = a_pt.T * np.float32(scale / cfg.scale)  # (in, r): PEFT's scale carried by A
        b = b_pt.T  # (r, out)
        try:
            pair, slots, n = method.import_lora(cfg, a, b, pairs[entry], frozen[entry])
        except ImportRefused as e:
            raise PeftImportError(f"adapter module {name!r} has {e}") from None
        merged = slots is not frozen[entry]
        pairs[entry], frozen[entry] = pair, slots
        if not merged:
            continue
        merges[entry] = jnp.asarray(n, jnp.int32)
        module, layer = trainer.entry_origin[entry]
        if module in trainer.folded:
            base = artifacts.fold_into_kernel(base, module, layer, spec, cfg.scale * (a @ b))
    extra, base = _modules_to_save(adapter, state.extra, base, torch_name)
    new = AdapterState(pairs, frozen, merges, entries.done)
    return state._replace(base=base, extra=extra, adapters=trainer.restacked(new))


def _modules_to_save(
    adapter: PeftAdapter, extra: Mapping, base: Mapping, torch_name: Callable[[str], str]
) -> tuple[dict, dict]:
    """``modules_to_save`` tensors written over the matching params (Flax layout: a Dense
    ``weight`` becomes its transposed ``kernel``, an embedding's ``weight`` its
    ``embedding``); a name this model lacks, or a shape that differs, is an error."""
    if not adapter.saved:
        return dict(extra), dict(base)
    trees = {
        "extra": traverse_util.flatten_dict(dict(extra), sep="/"),
        "base": traverse_util.flatten_dict(dict(base), sep="/"),
    }
    index = {}
    for where, flat in trees.items():
        for key in flat:
            module, _, leaf = key.rpartition("/")
            pt_leaf = {"kernel": "weight", "embedding": "weight", "scale": "weight"}.get(leaf, leaf)
            index[f"{torch_name(module)}.{pt_leaf}"] = (where, key, leaf == "kernel")
    for name, value in sorted(adapter.saved.items()):
        if name not in index:
            raise PeftImportError(
                f"adapter modules_to_save tensor {name!r} {value.shape} does not exist in this "
                f"model (another base model, {adapter.base_model!r}?)"
            )
        where, key, transpose = index[name]
        old = trees[where][key]
        new = np.asarray(value).T if transpose else np.asarray(value)
        if tuple(new.shape) != tuple(old.shape):
            raise PeftImportError(
                f"adapter modules_to_save tensor {name!r}: shape {value.shape} does not fit "
                f"this model's {key} {tuple(old.shape)}"
            )
        trees[where][key] = jnp.asarray(new, old.dtype)
    return (
        traverse_util.unflatten_dict(trees["extra"], sep="/"),
        traverse_util.unflatten_dict(trees["base"], sep="/"),
    )


def load_for_run(trainer: AromaTrainer, state: TrainState, arch: str, directory) -> TrainState:
    """`load_adapter` with the PyTorch names of the run's architecture (the runner's hook)."""
    from aroma_jax.models.hf import torch_module_name

    return load_adapter(trainer, state, directory, lambda p: torch_module_name(arch, p))


__all__ = ["PeftAdapter", "PeftImportError", "load_adapter", "load_for_run", "read_adapter"]
