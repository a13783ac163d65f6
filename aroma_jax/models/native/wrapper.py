"""`NativeWrapper`: what the native models share behind HF Flax's calling convention.

`aroma_jax.models.native.causal_lm.NativeCausalLM` (LLaMA family),
`aroma_jax.models.native.encoder_model.NativeEncoder` (BERT / RoBERTa classifiers) and
`aroma_jax.models.native.seq2seq_model.NativeSeq2SeqLM` (BART) each hold a linen module (and,
where it has dropout, a training copy of it), its config and params, and speak as HF Flax
models do: ``model(..., params=..., train=..., dropout_rng=...).logits``, ``model.config``,
``model.params``, ``model.save_pretrained(dir, params=...)``. This module keeps the parts that
do not depend on the family: building the modules, random params, the scanned layout of each
layer stack (`layer_stacks`), applying with or without dropout, finding a checkpoint (local or
hub, `resolve`), its tokenizer (`load_tokenizer`) and writing ``config.json`` and
``model.safetensors``.

Example:
    >>> from aroma_jax.models.native.bert import EncoderConfig
    >>> from aroma_jax.models.native.encoder_model import NativeEncoder
    >>> cfg = EncoderConfig.from_dict({"model_type": "bert", "vocab_size": 40, "hidden_size": 16,
    ...     "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 32})
    >>> NativeEncoder(cfg, scan_layers=True).layer_stacks
    ((('bert', 'encoder', 'layer'), 2),)
"""

from __future__ import annotations

import abc
import json
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from aroma_jax.models.native import checkpoint_io
from aroma_jax.models.native.modeling import is_scanned, stack_layers

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]

# Files that hold a vocabulary. transformers 5 builds an empty tokenizer (special tokens only,
# every word unknown) from a directory without them instead of failing, so they are required.
VOCAB_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


class LogitsOutput(NamedTuple):
    logits: jax.Array


class GenerateOutput(NamedTuple):
    sequences: jax.Array


class NativeWrapper(abc.ABC):
    """A linen module of class `module_class` with its config and params (the base class).

    With ``scan_layers=True`` the module scans its layers and ``params`` are kept in the stacked
    layout; unrolled ``params`` given to the constructor are stacked (`stack_layers`), ``{}``
    stands for weights still to come, ``None`` for random ones (`init_params`). ``params``
    passed to a call must already match.

    A subclass names `module_class`, says whether it has dropout (`has_dropout`: then
    ``train_module`` is the same module with dropout on), where its layers live
    (`layer_stacks`) and what `init_params` feeds the module (`init_inputs`).
    """

    module_class: ClassVar[type]
    has_dropout: ClassVar[bool] = True

    def __init__(
        self,
        config: Any,
        params: Any = None,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat: str = "none",
        attention_impl: str | None = None,
        seed: int = 0,
        scan_layers: bool = False,
    ):
        self.config = config
        self.dtype = dtype
        self.scan_layers = scan_layers
        self.source: Path | None = None  # the directory it was loaded from (tokenizer files)
        # save_pretrained writes PyTorch-layout safetensors itself (no torch round trip needed)
        self.writes_pytorch_layout = True
        self._generate_fns: dict = {}  # generate's compiled programs, by settings
        kw = dict(
            dtype=dtype,
            param_dtype=param_dtype,
            remat=remat,
            attention_impl=attention_impl,
            scan_layers=scan_layers,
        )
        cls = self.module_class
        if self.has_dropout:
            self.module = cls(config, deterministic=True, **kw)
            self.train_module = cls(config, deterministic=False, **kw)
        else:
            self.module = self.train_module = cls(config, **kw)
        self.params = self._in_layout(params, seed)

    @property
    @abc.abstractmethod
    def layer_stacks(self) -> tuple[tuple[tuple[str, ...], int], ...]:
        """``(path, layers)`` of each layer stack in ``params`` (stacked under
        ``scan_layers``)."""

    @property
    def layers_at(self) -> tuple[tuple[str, ...], ...]:
        """The paths of the layer stacks (`checkpoint_io.save_safetensors`'s ``layers_at``)."""
        return tuple(at for at, _ in self.layer_stacks)

    def init_inputs(self) -> tuple:
        """The arguments after the RNG that ``module.init`` is traced with."""
        return (jnp.ones((1, 2), jnp.int32),)

    def init_params(self, seed: int = 0) -> dict:
        """Random params as HF initialises them (normal kernels and embeddings, unit norms,
        zero biases)."""
        return jax.jit(self.module.init)(jax.random.key(seed), *self.init_inputs())["params"]

    def param_shapes(self, seed: int = 0) -> dict:
        """The flat ``{path: ShapeDtypeStruct}`` of `init_params` (traced, nothing computed)."""
        return traverse_util.flatten_dict(jax.eval_shape(lambda: self.init_params(seed)))

    def _in_layout(self, params: Any, seed: int) -> Any:
        if params is None:
            return self.init_params(seed)
        (first, _), *_ = self.layer_stacks
        if self.scan_layers and params and not is_scanned(params, first):  # {}: no weights yet
            for at, n in self.layer_stacks:
                params = stack_layers(params, n, at)
        elif not self.scan_layers and params and is_scanned(params, first):
            raise ValueError(
                f"params are in the scanned layout ({'/'.join(first)}/<sub-path> (L, ...)): "
                "pass scan_layers=True, or unstack_layers(params) first"
            )
        return params

    def _apply(self, params: Any, args: list, train: bool, dropout_rng: Any) -> LogitsOutput:
        """``module(*args)`` with ``params`` (default: the model's); with ``train`` and a
        ``dropout_rng``, ``train_module`` with dropout."""
        params = self.params if params is None else params
        if train and dropout_rng is not None and self.has_dropout:
            out = self.train_module.apply({"params": params}, *args, rngs={"dropout": dropout_rng})
        else:
            out = self.module.apply({"params": params}, *args)
        return LogitsOutput(out)

    def _write(
        self,
        out: str | Path,
        params: Any,
        config_json: dict,
        sort_keys: bool = False,
        **safetensors_kw: Any,
    ) -> Path:
        """``config.json`` and ``model.safetensors`` (``params``, or the model's) in ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        params = self.params if params is None else params
        (out / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=sort_keys))
        checkpoint_io.save_safetensors(params, out / "model.safetensors", **safetensors_kw)
        return out


def on_device(w: Any, dtype: np.dtype) -> jax.Array:
    """A checkpoint tensor cast to ``dtype`` and placed on the default device."""
    return jax.device_put(np.ascontiguousarray(np.asarray(w).astype(dtype)))


def has_safetensors(path: Path) -> bool:
    return any((path / f).exists() for f in ("model.safetensors", "model.safetensors.index.json"))


def resolve(name_or_path: str | Path) -> Path:
    """A local directory as is; anything else is downloaded from the hub (config, safetensors,
    tokenizer files only)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/")):
        raise FileNotFoundError(f"{str(name_or_path)!r} is not a model directory")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), allow_patterns=HUB_PATTERNS))


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer through transformers' AutoTokenizer (4.x and 5.x); a local
    directory without a vocabulary file (`VOCAB_FILES`) is a `FileNotFoundError`."""
    from transformers import AutoTokenizer

    path = Path(path)
    if path.is_dir() and not any((path / f).exists() for f in VOCAB_FILES):
        raise FileNotFoundError(
            f"no tokenizer vocabulary in {str(path)!r}: accepted one of {', '.join(VOCAB_FILES)}"
        )
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def first_set(*values: Any) -> Any:
    """The first value that is not ``None`` (a keyword, else the config's, else a default)."""
    return next(v for v in values if v is not None)
