"""Exports of a finished run: the merged HF model, and the adapter in HF PEFT's LoRA format.

* ``export_merged``: ``W0 + s * A @ B`` merged in fp32 into every adapted kernel, the trained
  head put back, then ``save_pretrained`` (Flax weights, config, tokenizer). Loads back with the
  same Flax class, and in PyTorch transformers with ``from_flax=True``.
* ``export_peft``: ``adapter_config.json`` (``peft_type: LORA``, per-module ``rank_pattern`` and
  ``alpha_pattern`` so that PEFT's ``alpha / r`` equals our scale; DoRA adds ``use_dora: true``
  and ``lora_magnitude_vector``; AdaLoRA writes ``peft_type: ADALORA`` with its ``rank_pattern``
  and ``lora_A``/``lora_E``/``lora_B``) and
  ``adapter_model.safetensors`` with ``base_model.model.<torch module>.lora_A.weight (k, in)``
  and ``.lora_B.weight (out, k)`` — Flax kernels are ``(in, out)``, so factors are transposed.
  Modules that ended at rank 0 are left out; a trained head goes to ``modules_to_save``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from aroma_jax.core import methods
from aroma_jax.train import artifacts, run_config
from aroma_jax.train.checkpoint import staged_export


def _load(run_dir: Path, which: str = "final"):
    from aroma_jax.train.best import check_which
    from aroma_jax.train.pipeline import build_pipeline

    cfg = run_config.load_run(run_dir)
    pipe = build_pipeline(cfg)
    tensors, meta = artifacts.load_final(check_which(run_dir, which))
    return cfg, pipe, tensors, meta


def merged_params(params: Mapping, tensors: Mapping[str, np.ndarray], meta: Mapping) -> dict:
    """The base params with every update merged in fp32 and the head replaced.

    The artefact names one layer per module (``model/layers/3/self_attn/q_proj``); a scanned
    native model's stacked params are unstacked to match (its ``save_pretrained`` takes both).
    """
    params = jax.device_get(dict(params))
    from aroma_jax.models.native import STACK_PATHS, is_scanned, unstack_layers

    for at in STACK_PATHS:
        if is_scanned(params, at):
            params = unstack_layers(params, at)
    flat = traverse_util.flatten_dict(params, sep="/")
    method = methods.get(meta.get("method", "aroma"))
    for path in meta["paths"]:
        a, b = artifacts.factors(tensors, path)
        if a.shape[1] == 0:
            continue
        key = f"{path}/kernel"
        w = np.asarray(flat[key])
        w2 = w.astype(np.float32).reshape(a.shape[0], b.shape[1])
        new = method.merged_kernel(w2, a, b, tensors, path, meta)
        flat[key] = new.reshape(w.shape).astype(w.dtype)
    extra = traverse_util.flatten_dict(artifacts.extra_params(dict(tensors)), sep="/")
    for key, value in extra.items():
        flat[key] = value
    return traverse_util.unflatten_dict(flat, sep="/")


def torch_class_name(flax_model: Any) -> str:
    """``FlaxRobertaForSequenceClassification`` -> ``RobertaForSequenceClassification``."""
    for cls in type(flax_model).__mro__:
        if cls.__name__.startswith("Flax") and hasattr(cls, "module_class"):
            return cls.__name__[len("Flax") :]
    raise ValueError(f"cannot tell the PyTorch class of {type(flax_model).__name__}")


def save_pytorch_weights(flax_model: Any, params: Mapping, out: Path) -> Path | None:
    """Also writes PyTorch ``model.safetensors`` when torch is installed.

    transformers 4.57's ``from_pretrained(..., from_flax=True)`` leaves weights on the meta
    device, so the conversion is done here, once, with a real CPU model. Native models
    (`aroma_jax.models.native`) write PyTorch-layout safetensors in ``save_pretrained``.
    """
    if getattr(flax_model, "writes_pytorch_layout", False):
        return None
    try:
        import torch  # noqa: F401
        import transformers
        from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model
    except ImportError:
        return None
    cls = getattr(transformers, torch_class_name(flax_model))
    pt_model = cls(flax_model.config)
    load_flax_weights_in_pytorch_model(pt_model, jax.device_get(dict(params)))
    pt_model.save_pretrained(str(out), safe_serialization=True)
    return out / "model.safetensors"


MODEL_SUFFIXES = (".safetensors", ".msgpack", ".bin", ".pt", ".pth", ".gguf", ".h5", ".ckpt")


def held_model_files(out: Path) -> list[str]:
    """The names in ``out`` that an export would replace or that belong to another model: adapter
    and model weights, their indexes, ``adapter_config.json`` and ``config.json``."""
    if not out.is_dir():
        return []
    return sorted(
        p.name
        for p in out.iterdir()
        if p.name.startswith("adapter_")
        or p.name == "config.json"
        or p.name.endswith(MODEL_SUFFIXES)
        or p.name.endswith(".index.json")
    )


def check_target(out: str | Path, overwrite: bool = False) -> None:
    """Refuses an export target that already holds model or adapter files, unless ``overwrite``
    (other files in it are never touched either way)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"export target {str(out)!r} is a file: accepted a directory")
    held = held_model_files(out)
    if held and not overwrite:
        shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        raise FileExistsError(
            f"export target {str(out)!r} already holds model or adapter files ({shown}): pass "
            "--overwrite to replace them, or choose an empty directory"
        )


def with_labels(config: dict, names: list[str] | None) -> dict:
    """An HF ``config.json`` dict with ``id2label``/``label2id`` from the run's class names."""
    if names:
        config = dict(config)
        config["id2label"] = {str(i): str(n) for i, n in enumerate(names)}
        config["label2id"] = {str(n): i for i, n in enumerate(names)}
    return config


def _config_dict(config: Any) -> dict | None:
    """The ``config.json`` dict of an HF config or of a native model's config (None: neither)."""
    if hasattr(config, "to_dict"):  # transformers' PretrainedConfig
        return config.to_dict()
    hf = getattr(config, "hf_dict", None)  # native encoders and BART keep their source's dict
    return dict(hf) if hf else None


def _label_config_file(path: Path, names: list[str] | None) -> None:
    """Adds the class names to a written ``config.json`` (HF and native models alike)."""
    if names and path.exists():
        path.write_text(json.dumps(with_labels(json.loads(path.read_text()), names), indent=2))


def export_merged(
    run_dir: str | Path, out: str | Path, overwrite: bool = False, which: str = "final"
) -> Path:
    """The merged model in ``out`` (config with the run's class names); see the module doc.
    ``which``: the run's final/ or best/ adapters (`aroma_jax.train.best`)."""
    run_dir, out = Path(run_dir), Path(out)
    check_target(out, overwrite)
    _, pipe, tensors, meta = _load(run_dir, which)
    params = merged_params(pipe.params, tensors, meta)
    with staged_export(out, "config.json") as stage:  # a failed write leaves no half model
        save_pytorch_weights(pipe.model, params, stage)
        pipe.model.save_pretrained(str(stage), params=params)
        _label_config_file(stage / "config.json", meta.get("label_names"))
        if pipe.tokenizer is not None:
            pipe.tokenizer.save_pretrained(str(stage))
    return out


def peft_files(
    tensors: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
    torch_name,
    base_model: str,
    task_type: str | None,
    head_modules: list[str],
) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config, safetensors dict) in HF PEFT's format for the run's method: LoRA
    (AROMA, LoRA, ReLoRA), LoRA with ``use_dora`` (DoRA) or ``ADALORA`` (`Method.peft_files`)."""
    config, state = methods.get(meta.get("method", "aroma")).peft_files(tensors, meta, torch_name)
    state.update(_head_tensors(tensors, torch_name))
    config.update(
        base_model_name_or_path=base_model,
        task_type=task_type,
        lora_dropout=float(meta.get("adapter_dropout", 0.0)),  # for users who train on
        bias="none",
        fan_in_fan_out=False,
        init_lora_weights=True,
        modules_to_save=head_modules or None,
        inference_mode=True,
        use_rslora=False,
    )
    return config, state


def _head_tensors(tensors, torch_name) -> dict[str, np.ndarray]:
    """A trained head (PEFT's ``modules_to_save``) under its plain module names."""
    state: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        if not key.startswith("extra/"):
            continue
        flax_path = key[len("extra/") :]
        module, _, leaf = flax_path.rpartition("/")
        name = torch_name(module)
        value = np.asarray(value, np.float32)
        if leaf == "kernel":
            state[f"base_model.model.{name}.weight"] = np.ascontiguousarray(value.T)
        elif leaf == "bias":
            state[f"base_model.model.{name}.bias"] = value
        elif leaf in ("embedding", "scale"):
            state[f"base_model.model.{name}.weight"] = value
    return state


# The hub ids of the offline assets, so `AutoPeftModel*.from_pretrained(adapter_dir)` can load
# the base model the adapter was trained on.
ASSET_HUB_IDS = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def base_model_id(name: str) -> str:
    """``base_model_name_or_path`` for a run's ``model.name``: an offline asset's hub id, a local
    directory's absolute path, anything else (a hub id, a tiny random model) as it is."""
    if name in ASSET_HUB_IDS:
        return ASSET_HUB_IDS[name]
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    return name


def export_peft(
    run_dir: str | Path, out: str | Path, overwrite: bool = False, which: str = "final"
) -> Path:
    """The PEFT adapter in ``out``; a run with class names also writes the base model's
    ``config.json`` with its ``num_labels``, ``id2label`` and ``label2id`` (load the base with
    ``config=AutoConfig.from_pretrained(out)`` to see the names). ``which``: final/ or best/."""
    from aroma_jax.models import hf as models

    run_dir, out = Path(run_dir), Path(out)
    check_target(out, overwrite)
    cfg, pipe, tensors, meta = _load(run_dir, which)
    torch_name = lambda path: models.torch_module_name(pipe.arch, path)  # noqa: E731
    heads = sorted(
        {
            torch_name(k[len("extra/") :].rpartition("/")[0]).split(".")[0]
            for k in tensors
            if k.startswith("extra/")
        }
    )
    task_type = {"llama": "CAUSAL_LM", "bart": "SEQ_2_SEQ_LM"}.get(pipe.arch, "SEQ_CLS")
    base = base_model_id(cfg.model.name)
    config, state = peft_files(tensors, meta, torch_name, base, task_type, heads)
    # PEFT stores modules_to_save weights under their plain module names. A failed write leaves
    # no half adapter: PEFT opens adapter_config.json first, and it is moved in last.
    with staged_export(out, "adapter_config.json") as stage:
        save_file(state, str(stage / "adapter_model.safetensors"), metadata={"format": "pt"})
        (stage / "adapter_config.json").write_text(json.dumps(config, indent=2))
        base_config = _config_dict(pipe.model.config)
        if meta.get("label_names") and base_config is not None:
            labelled = with_labels(base_config, meta["label_names"])
            (stage / "config.json").write_text(json.dumps(labelled, indent=2))
    return out
