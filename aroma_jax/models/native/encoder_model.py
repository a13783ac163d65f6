"""`NativeEncoder`: native BERT / RoBERTa sequence classifiers behind HF Flax's calling convention.

``model(input_ids, attention_mask=..., token_type_ids=..., params=..., train=...,
dropout_rng=...).logits``, ``model.config``, ``model.params``, ``model.save_pretrained(dir,
params=...)``, as `aroma_jax.data.objectives.classification` and export expect.

* `from_pretrained` reads ``config.json`` and safetensors (or an HF Flax ``flax_model.msgpack``,
  whose tree is the same): a ``*ForSequenceClassification``
  checkpoint, or a bare ``BertModel`` / ``RobertaModel`` saved without the ``bert.`` prefix
  (the MiniLM asset as shipped). Weights a classifier does not use (``cls.*``, ``lm_head.*``,
  RoBERTa's pooler, buffers) are skipped; a head absent from the checkpoint, or of another
  ``num_labels``, is initialised as HF does (normal(initializer_range) kernels, zero biases).
* `save_pretrained` writes ``config.json`` (``architectures``, ``num_labels``) and
  ``model.safetensors`` in PyTorch layout, which PyTorch transformers 4.x/5.x
  ``AutoModelForSequenceClassification`` loads.
* ``scan_layers=True`` keeps the layers stacked at ``<prefix>/encoder/layer`` (`layers_path`).
* ``train=True`` with a ``dropout_rng`` applies the config's dropout (hidden, attention
  probabilities, classifier), as HF Flax does.

Example:
    >>> from aroma_jax.models.native.bert import EncoderConfig
    >>> cfg = EncoderConfig.from_dict({"model_type": "roberta", "vocab_size": 40,
    ...     "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 4,
    ...     "intermediate_size": 32, "max_position_embeddings": 20, "type_vocab_size": 1})
    >>> import numpy as np
    >>> NativeEncoder(cfg).__call__(np.full((1, 4), 5)).logits.shape
    (1, 2)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import flax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from aroma_jax.models.native import pt_layout
from aroma_jax.models.native.bert import EncoderConfig, SequenceClassifier
from aroma_jax.models.native.checkpoint_io import CheckpointError
from aroma_jax.models.native.wrapper import (
    LogitsOutput,
    NativeWrapper,
    has_safetensors,
    on_device,
    resolve,
)

ARCHITECTURES = {
    "bert": "BertForSequenceClassification",
    "roberta": "RobertaForSequenceClassification",
}
BASE_MODULES = ("embeddings", "encoder", "pooler")  # a bare BertModel's top-level names
SKIP_PREFIXES = ("cls.", "lm_head.")  # pre-training heads
HEAD_MODULES = ("classifier", "pooler")  # initialised when the checkpoint lacks them
# `EncoderConfig` fields written back to config.json (in this order)
CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "pad_token_id",
    "initializer_range",
)


def layers_path(config: EncoderConfig) -> tuple[str, ...]:
    """Where the layer stack lives: ``("bert", "encoder", "layer")``."""
    return (config.prefix, "encoder", "layer")


class NativeEncoder(NativeWrapper):
    """A `SequenceClassifier` with its config and params and the HF Flax calling convention
    (`NativeWrapper`: the scanned layout, params, dropout, saving)."""

    module_class = SequenceClassifier

    @property
    def layer_stacks(self) -> tuple[tuple[tuple[str, ...], int], ...]:
        return ((layers_path(self.config), self.config.num_hidden_layers),)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        params=None,
        train: bool = False,
        dropout_rng=None,
        **unused,
    ) -> LogitsOutput:
        """Logits ``(batch, num_labels)``; with ``train`` and a ``dropout_rng``, with dropout."""
        del unused
        args = [jnp.asarray(input_ids)]
        args += [None if a is None else jnp.asarray(a) for a in (attention_mask, token_type_ids)]
        args.append(position_ids)
        return self._apply(params, args, train, dropout_rng)

    # ---------------------------------------------------------------------------- files
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        num_labels: int | None = None,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat: str = "none",
        attention_impl: str | None = None,
        seed: int = 0,
        scan_layers: bool = False,
        **unused,
    ) -> NativeEncoder:
        """From a local directory or a hub name (config, safetensors, tokenizer files)."""
        path = resolve(name_or_path)
        config = EncoderConfig.from_file(path)
        if num_labels is not None:
            config = config.replace(num_labels=int(num_labels))
        model = cls(config, {}, dtype, param_dtype, remat, attention_impl, seed, False)
        msgpack = path / "flax_model.msgpack"
        if msgpack.exists() and not has_safetensors(path):  # an HF Flax checkpoint
            tree = flax.serialization.msgpack_restore(msgpack.read_bytes())
            if config.prefix not in tree:  # a base model's file (FlaxBertModel): no prefix
                tree = {config.prefix: tree}
            loaded = traverse_util.flatten_dict(tree)
        else:
            loaded = pt_layout.read_checkpoint(path, _renamer(config))
        model.params = _complete(model, loaded, seed, np.dtype(param_dtype))
        if scan_layers:
            model = cls(config, model.params, dtype, param_dtype, remat, attention_impl, seed, True)
        model.source = path
        return model

    def save_pretrained(self, out: str | Path, params: Any = None) -> Path:
        """``config.json`` + ``model.safetensors`` (PyTorch layout) in ``out``."""
        return self._write(
            out,
            params,
            hf_config(self.config),
            to_torch=pt_layout.to_torch,
            layers_at=self.layers_at,
        )


def hf_config(c: EncoderConfig) -> dict:
    """The ``config.json`` of a sequence classifier: the source's keys, with this model's
    architecture and labels."""
    d = dict(c.hf_dict)
    d.update(model_type=c.model_type, architectures=[ARCHITECTURES[c.model_type]])
    d.update({key: getattr(c, key) for key in CONFIG_KEYS})
    if len(d.get("id2label") or {}) != c.num_labels:
        d["id2label"] = {str(i): f"LABEL_{i}" for i in range(c.num_labels)}
        d["label2id"] = {f"LABEL_{i}": i for i in range(c.num_labels)}
    d["num_labels"] = c.num_labels
    if c.problem_type:
        d["problem_type"] = c.problem_type
    return d


def _renamer(config: EncoderConfig):
    """PyTorch name -> the name in a classifier's tree, or None for tensors it does not use."""

    def rename(name: str) -> str | None:
        if name.startswith(SKIP_PREFIXES) or name.endswith(("position_ids", "token_type_ids")):
            return None
        if name.split(".")[0] in BASE_MODULES:  # a bare base model (MiniLM asset)
            name = f"{config.prefix}.{name}"
        if config.model_type == "roberta" and name.startswith("roberta.pooler."):
            return None  # RobertaForSequenceClassification has no pooler
        return name

    return rename


def _complete(model: NativeEncoder, loaded: dict, seed: int, dtype: np.dtype) -> dict:
    """The checkpoint's leaves checked against the model's tree, cast and placed; head leaves
    it lacks (or holds with another shape) initialised."""
    shapes = model.param_shapes(seed)
    unknown = sorted("/".join(p) for p in loaded if p not in shapes)
    if unknown:
        raise CheckpointError(
            f"unexpected tensors for a native {model.config.model_type} classifier: "
            f"{unknown[:5]} (Flax paths)"
        )
    flat, missing = {}, []
    for p, s in shapes.items():
        w = loaded.get(p)
        if w is not None and tuple(w.shape) != tuple(s.shape):
            if p[0] not in HEAD_MODULES:
                raise CheckpointError(
                    f"{'/'.join(p)} has shape {tuple(w.shape)} in the checkpoint: the config "
                    f"says {tuple(s.shape)}"
                )
            print(
                f"native encoder: re-initialising {'/'.join(p)} {tuple(w.shape)} -> "
                f"{tuple(s.shape)} (num_labels)",
                file=sys.stderr,
            )
            w = None
        if w is None:
            missing.append(p)
        else:
            flat[p] = on_device(w, dtype)
    base = [p for p in missing if p[0] not in HEAD_MODULES and p[1:2] != ("pooler",)]
    if base:
        raise CheckpointError(
            f"the checkpoint lacks {len(base)} weights of the encoder, e.g. "
            f"{['/'.join(p) for p in base[:3]]}"
        )
    if missing:
        fresh = traverse_util.flatten_dict(model.init_params(seed))
        for p in missing:
            flat[p] = fresh[p].astype(dtype)
    return traverse_util.unflatten_dict(flat)
