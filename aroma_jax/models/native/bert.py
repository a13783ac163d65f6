"""Linen BERT and RoBERTa encoders with HF's sequence-classification / regression heads.

Param paths mirror HF's Flax classes (``bert/embeddings/word_embeddings/embedding``,
``bert/encoder/layer/<i>/attention/self/query/kernel``, ``.../attention/output/dense``,
``.../intermediate/dense``, ``.../output/dense``, ``.../LayerNorm/scale``, ``bert/pooler/dense``,
``classifier``; RoBERTa: ``roberta/...`` without a pooler and ``classifier/dense`` +
``classifier/out_proj``), so the target presets, ``train.head: paper`` (``classifier/dense``),
PEFT's ``modules_to_save`` and export see the same modules as on HF Flax.

* Embeddings: word + position + token type, then LayerNorm and dropout. RoBERTa numbers the
  positions of real tokens from ``pad_token_id + 1`` and gives padding ``pad_token_id`` (HF's
  ``create_position_ids_from_input_ids``).
* Post-LN layers (``LN(x + dropout(dense(attn)))``, ``LN(x + dropout(dense(act(dense(x)))))``)
  with the activation the config names (`aroma_jax.models.native.blocks.ACTIVATIONS`).
* Attention: ``jax.nn.dot_product_attention`` with a ``(batch, 1, 1, keys)`` mask of real tokens
  (HF adds ``finfo.min`` to masked keys: the same softmax). Attention-probability dropout, which
  that kernel cannot apply, runs the plain einsum/softmax path while training with a rate > 0.
* ``scan_layers``: the layers under ``nn.scan``: every layer leaf at
  ``<prefix>/encoder/layer/<sub-path>`` with a leading layer axis (adapter factors included);
  ``remat``: ``none`` | ``full`` | ``dots`` as in `aroma_jax.models.native.modeling`.
* Dropout is on when the module is built with ``deterministic=False`` (a ``dropout`` RNG is then
  needed); `aroma_jax.models.native.encoder_model.NativeEncoder` keeps one module per mode.

Example:
    >>> import jax, jax.numpy as jnp
    >>> cfg = EncoderConfig.from_dict({"model_type": "bert", "vocab_size": 40, "hidden_size": 16,
    ...     "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 32})
    >>> m = SequenceClassifier(cfg.replace(num_labels=3))
    >>> ids = jnp.ones((2, 5), jnp.int32)
    >>> p = m.init(jax.random.key(0), ids)["params"]
    >>> m.apply({"params": p}, ids).shape
    (2, 3)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aroma_jax.models.native import blocks
from aroma_jax.models.native.blocks import Block, Stack
from aroma_jax.models.native.config import NativeConfigError, read_config_json
from aroma_jax.models.native.modeling import check_remat

ENCODER_TYPES = ("bert", "roberta")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """BERT / RoBERTa hyper-parameters from an HF ``config.json`` (hashable)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    initializer_range: float = 0.02
    num_labels: int = 2
    problem_type: str | None = None
    raw: tuple[tuple[str, Any], ...] = dataclasses.field(default=(), compare=False, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def prefix(self) -> str:
        """The base model's name in the param tree (``bert`` / ``roberta``)."""
        return self.model_type

    @property
    def hf_dict(self) -> dict[str, Any]:
        return json.loads(dict(self.raw)["json"]) if self.raw else {}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EncoderConfig:
        """Reads an HF ``config.json`` dict; rejects settings the native encoder does not run."""
        mt = d.get("model_type")
        if mt not in ENCODER_TYPES:
            raise NativeConfigError(
                f"model_type {mt!r} is not a native encoder: accepted {ENCODER_TYPES}"
            )
        need = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
        )
        missing = [k for k in need if d.get(k) is None]
        if missing:
            raise NativeConfigError(f"config.json lacks {missing} (model_type {mt!r})")
        pos = d.get("position_embedding_type") or "absolute"
        if pos != "absolute":
            raise NativeConfigError(
                f"position_embedding_type {pos!r} is not supported: accepted 'absolute'"
            )
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise NativeConfigError("is_decoder / add_cross_attention: accepted an encoder only")
        heads, hidden = int(d["num_attention_heads"]), int(d["hidden_size"])
        if hidden % heads:
            raise NativeConfigError(f"hidden_size={hidden} is not a multiple of heads={heads}")
        blocks.activation(d.get("hidden_act") or "gelu")
        labels = d.get("id2label")
        num_labels = int(d.get("num_labels") or (len(labels) if labels else 2))
        return cls(
            model_type=mt,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            intermediate_size=int(d["intermediate_size"]),
            hidden_act=d.get("hidden_act") or "gelu",
            hidden_dropout_prob=float(d.get("hidden_dropout_prob", 0.1) or 0.0),
            attention_probs_dropout_prob=float(d.get("attention_probs_dropout_prob", 0.1) or 0.0),
            classifier_dropout=d.get("classifier_dropout"),
            max_position_embeddings=int(d.get("max_position_embeddings") or 512),
            type_vocab_size=int(d.get("type_vocab_size") or 2),
            layer_norm_eps=float(d.get("layer_norm_eps") or 1e-12),
            pad_token_id=d.get("pad_token_id", 0 if mt == "bert" else 1),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            initializer_range=float(d.get("initializer_range") or 0.02),
            num_labels=num_labels,
            problem_type=d.get("problem_type"),
            raw=(("json", json.dumps(dict(d), sort_keys=True, default=str)),),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> EncoderConfig:
        """``config.json`` (or a directory holding it)."""
        return cls.from_dict(read_config_json(path))

    def replace(self, **kw) -> EncoderConfig:
        return dataclasses.replace(self, **kw)


def _dense(c: EncoderConfig, features: int, name: str | None, dtype, param_dtype) -> nn.Dense:
    return blocks.dense(features, c.initializer_range, name, dtype, param_dtype)


def _norm(c: EncoderConfig, dtype, param_dtype) -> nn.LayerNorm:
    return nn.LayerNorm(c.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, name="LayerNorm")


def _constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    return nn.with_logical_constraint(x, names)


def roberta_positions(input_ids: jax.Array, pad: int) -> jax.Array:
    """HF's ``create_position_ids_from_input_ids``: real tokens ``pad + 1, pad + 2, ...``,
    padding ``pad``."""
    real = (input_ids != pad).astype(jnp.int32)
    return jnp.cumsum(real, axis=1) * real + pad


class Embeddings(Block):
    """HF's ``embeddings``: word + position + token type, ``LayerNorm``, dropout."""

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids):
        c, dt, pdt = self.config, self.dtype, self.param_dtype
        def table(n, name):
            return blocks.embed(n, c.hidden_size, c.initializer_range, name, dt, pdt)

        x = table(c.vocab_size, "word_embeddings")(input_ids)
        x = x + table(c.max_position_embeddings, "position_embeddings")(position_ids)
        x = x + table(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
        x = _norm(c, dt, pdt)(x)
        return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=self.deterministic)


class SelfAttention(Block):
    """``query``, ``key``, ``value`` and the attention itself (HF's ``attention/self``)."""

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        c, dt, pdt = self.config, self.dtype, self.param_dtype
        b, t, _ = x.shape
        n, h = c.num_attention_heads, c.head_dim
        q = _dense(c, c.hidden_size, "query", dt, pdt)(x).reshape(b, t, n, h)
        k = _dense(c, c.hidden_size, "key", dt, pdt)(x).reshape(b, t, n, h)
        v = _dense(c, c.hidden_size, "value", dt, pdt)(x).reshape(b, t, n, h)
        out = blocks.attend(
            q,
            k,
            v,
            None if mask is None else mask[:, None, None, :],
            rate=c.attention_probs_dropout_prob,
            deterministic=self.deterministic,
            impl=self.attention_impl,
        )
        return out.reshape(b, t, n * h)


class Layer(Block):
    """One post-LN encoder layer; ``(x, mask) -> (x, None)`` is also ``nn.scan``'s body."""

    @nn.compact
    def __call__(self, x, mask):
        c, dt, pdt, det = self.config, self.dtype, self.param_dtype, self.deterministic
        x = _AttentionBlock(c, dt, pdt, det, self.attention_impl, name="attention")(x, mask)
        h = _Intermediate(c, dt, pdt, name="intermediate")(x)
        x = _Output(c, dt, pdt, det, name="output")(h, x)
        return _constrain(x, ("batch", "length", "embed")), None


class _Output(Block):
    """``LN(x + dropout(dense(h)))``: HF's ``attention/output`` and the layer's ``output``."""

    @nn.compact
    def __call__(self, h, x):
        c, dt, pdt = self.config, self.dtype, self.param_dtype
        y = _dense(c, c.hidden_size, "dense", dt, pdt)(h)
        y = nn.Dropout(c.hidden_dropout_prob)(y, deterministic=self.deterministic)
        return _norm(c, dt, pdt)(y + x)


class _AttentionBlock(Block):
    """HF's ``attention``: ``self`` and its ``output``."""

    @nn.compact
    def __call__(self, x, mask):
        c, dt, pdt, det = self.config, self.dtype, self.param_dtype, self.deterministic
        a = SelfAttention(c, dt, pdt, det, self.attention_impl, name="self")(x, mask)
        a = _constrain(a, ("batch", "length", "heads"))
        return _Output(c, dt, pdt, det, name="output")(a, x)


class _Intermediate(Block):
    """HF's ``intermediate``: ``dense`` and the activation."""

    @nn.compact
    def __call__(self, x):
        c = self.config
        h = _dense(c, c.intermediate_size, "dense", self.dtype, self.param_dtype)(x)
        return _constrain(blocks.activation(c.hidden_act)(h), ("batch", "length", "mlp"))


class Encoder(Stack):
    """HF's ``encoder``: its layers live under ``layer`` (unrolled or scanned)."""

    @nn.compact
    def __call__(self, x, mask):
        n = self.config.num_hidden_layers
        return blocks.layer_stack(self, Layer, n, (nn.broadcast,), "layer")(x, mask)[0]


class BaseModel(Stack):
    """Embeddings + encoder (+ BERT's pooler): HF's ``bert`` / ``roberta`` module."""

    pooler: bool = True

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
        """``(hidden states (batch, t, hidden), pooled (batch, hidden) or None)``."""
        c, dt, pdt, det = self.config, self.dtype, self.param_dtype, self.deterministic
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if position_ids is None:
            if c.model_type == "roberta":
                position_ids = roberta_positions(input_ids, int(c.pad_token_id or 0))
            else:
                position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        x = Embeddings(c, dt, pdt, det, name="embeddings")(input_ids, token_type_ids, position_ids)
        x = _constrain(x, ("batch", "length", "embed"))
        mask = None if attention_mask is None else attention_mask.astype(bool)
        x = Encoder(c, name="encoder", **self.stack_kwargs())(x, mask)
        if not self.pooler:
            return x, None
        pooled = jnp.tanh(_Pooler(c, dt, pdt, name="pooler")(x[:, 0]))
        return x, pooled


class _Pooler(Block):
    """HF's ``pooler/dense`` (the caller applies the tanh)."""

    @nn.compact
    def __call__(self, first):
        c = self.config
        return _dense(c, c.hidden_size, "dense", self.dtype, self.param_dtype)(first)


class RobertaHead(Block):
    """HF's ``RobertaClassificationHead``: dropout, ``dense``, tanh, dropout, ``out_proj``."""

    @nn.compact
    def __call__(self, first):
        c, dt, pdt = self.config, self.dtype, self.param_dtype
        drop = nn.Dropout(_classifier_dropout(c))
        h = drop(first, deterministic=self.deterministic)
        h = jnp.tanh(_dense(c, c.hidden_size, "dense", dt, pdt)(h))
        h = drop(h, deterministic=self.deterministic)
        return _dense(c, c.num_labels, "out_proj", dt, pdt)(h)


def _classifier_dropout(c: EncoderConfig) -> float:
    """HF's head dropout: ``classifier_dropout``, else ``hidden_dropout_prob``."""
    return c.classifier_dropout if c.classifier_dropout is not None else c.hidden_dropout_prob


class SequenceClassifier(Stack):
    """HF's ``{Bert,Roberta}ForSequenceClassification``: logits ``(batch, num_labels)``
    (one column for regression, ``num_labels=1``)."""

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
        c, dt, pdt, det = self.config, self.dtype, self.param_dtype, self.deterministic
        check_remat(self.remat)
        bert = c.model_type == "bert"
        base = BaseModel(c, pooler=bert, name=c.prefix, **self.stack_kwargs())
        x, pooled = base(input_ids, attention_mask, token_type_ids, position_ids)
        if not bert:
            return RobertaHead(c, dt, pdt, det, name="classifier")(x[:, 0])
        pooled = nn.Dropout(_classifier_dropout(c))(pooled, deterministic=det)
        return _dense(c, c.num_labels, "classifier", dt, pdt)(pooled)
