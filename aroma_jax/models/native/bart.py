"""Linen BART (encoder-decoder) with HF's Flax param paths, for seq2seq training and decoding.

Paths: ``model/shared/embedding``, ``model/{encoder,decoder}/embed_positions/embedding``,
``model/{encoder,decoder}/layernorm_embedding``, ``model/encoder/layers/<i>/{self_attn/{q,k,v,
out}_proj, self_attn_layer_norm, fc1, fc2, final_layer_norm}``, the decoder's layers adding
``encoder_attn/{q,k,v,out}_proj`` and ``encoder_attn_layer_norm``, and ``final_logits_bias
(1, vocab)``. The LM head is the shared embedding (``tie_word_embeddings``, every BART).

* Post-LN layers, learned positions offset by 2 (HF's ``BartLearnedPositionalEmbedding``),
  ``scale_embedding`` (``sqrt(d_model)``), the activation the config names.
* Attention through ``jax.nn.dot_product_attention`` (causal + key padding in the decoder);
  attention-probability dropout, which that kernel lacks, takes the plain einsum path while
  training with ``attention_dropout > 0``.
* Decoding: ``decode(..., cache=KVCache, index=i)`` writes the new tokens' self-attention keys
  and values at buffer slots ``i ..`` (`aroma_jax.models.native.modeling.KVCache`, one per
  decoder layer) and attends over the filled slots; the cross-attention keys and values are
  computed once per call from the encoder output.
* ``scan_layers``: both stacks under ``nn.scan`` (``model/encoder/layers/<sub-path> (L, ...)``,
  same for the decoder); ``remat`` as in `aroma_jax.models.native.modeling`.

Example:
    >>> import jax, jax.numpy as jnp
    >>> cfg = BartConfig.from_dict({"model_type": "bart", "vocab_size": 40, "d_model": 16,
    ...     "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 4,
    ...     "decoder_attention_heads": 4, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32,
    ...     "max_position_embeddings": 32})
    >>> m = Seq2SeqLM(cfg)
    >>> ids = jnp.ones((2, 5), jnp.int32)
    >>> p = m.init(jax.random.key(0), ids, None, ids[:, :3])["params"]
    >>> m.apply({"params": p}, ids, None, ids[:, :3]).shape
    (2, 3, 40)
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aroma_jax.models.native import blocks
from aroma_jax.models.native.blocks import Block, Stack
from aroma_jax.models.native.config import NativeConfigError, read_config_json
from aroma_jax.models.native.modeling import KVCache, check_remat

POSITION_OFFSET = 2  # HF's BartLearnedPositionalEmbedding
GENERATION_KEYS = (
    "num_beams",
    "max_length",
    "min_length",
    "length_penalty",
    "no_repeat_ngram_size",
    "early_stopping",
    "forced_bos_token_id",
    "forced_eos_token_id",
)


@dataclasses.dataclass(frozen=True)
class BartConfig:
    """BART hyper-parameters from an HF ``config.json`` (hashable)."""

    vocab_size: int
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    max_position_embeddings: int = 1024
    activation_function: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    scale_embedding: bool = False
    init_std: float = 0.02
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    decoder_start_token_id: int = 2
    # generation defaults (config.json / generation_config.json): sorted (key, value) pairs
    generation: tuple[tuple[str, Any], ...] = ()
    raw: tuple[tuple[str, Any], ...] = dataclasses.field(default=(), compare=False, repr=False)

    model_type = "bart"

    @property
    def num_hidden_layers(self) -> int:
        return self.encoder_layers + self.decoder_layers

    @property
    def hf_dict(self) -> dict[str, Any]:
        return json.loads(dict(self.raw)["json"]) if self.raw else {}

    @property
    def forced_bos_token_id(self) -> int | None:
        return dict(self.generation).get("forced_bos_token_id")

    @property
    def forced_eos_token_id(self) -> int | None:
        return dict(self.generation).get("forced_eos_token_id")

    @classmethod
    def from_dict(cls, d: dict[str, Any], generation: dict | None = None) -> BartConfig:
        """An HF ``config.json`` dict (and ``generation_config.json``, whose keys win)."""
        if d.get("model_type") != "bart":
            raise NativeConfigError(
                f"model_type {d.get('model_type')!r} is not BART: accepted 'bart'"
            )
        need = ("vocab_size", "d_model", "encoder_layers", "decoder_layers")
        missing = [k for k in need if d.get(k) is None]
        if missing:
            raise NativeConfigError(f"config.json lacks {missing} (model_type 'bart')")
        if d.get("normalize_before") or d.get("add_final_layer_norm"):
            raise NativeConfigError(
                "normalize_before / add_final_layer_norm (mBART's pre-LN) are not supported: "
                "accepted BART's post-LN (both false)"
            )
        act = d.get("activation_function") or "gelu"
        blocks.activation(act)
        gen = {k: d[k] for k in GENERATION_KEYS if d.get(k) is not None}
        gen.update({k: v for k, v in (generation or {}).items() if k in GENERATION_KEYS})
        gen = {k: v for k, v in gen.items() if v is not None}

        def get(key, default):
            value = d.get(key)
            return default if value is None else value

        return cls(
            vocab_size=int(d["vocab_size"]),
            d_model=int(d["d_model"]),
            encoder_layers=int(d["encoder_layers"]),
            decoder_layers=int(d["decoder_layers"]),
            encoder_attention_heads=int(get("encoder_attention_heads", 16)),
            decoder_attention_heads=int(get("decoder_attention_heads", 16)),
            encoder_ffn_dim=int(get("encoder_ffn_dim", 4096)),
            decoder_ffn_dim=int(get("decoder_ffn_dim", 4096)),
            max_position_embeddings=int(get("max_position_embeddings", 1024)),
            activation_function=act,
            dropout=float(get("dropout", 0.1)),
            attention_dropout=float(get("attention_dropout", 0.0)),
            activation_dropout=float(get("activation_dropout", 0.0)),
            scale_embedding=bool(get("scale_embedding", False)),
            init_std=float(get("init_std", 0.02)),
            pad_token_id=int(get("pad_token_id", 1)),
            bos_token_id=int(get("bos_token_id", 0)),
            eos_token_id=int(get("eos_token_id", 2)),
            decoder_start_token_id=int(get("decoder_start_token_id", 2)),
            generation=tuple(sorted(gen.items())),
            raw=(("json", json.dumps(dict(d), sort_keys=True, default=str)),),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> BartConfig:
        """``config.json`` (and ``generation_config.json`` beside it, if any)."""
        path = Path(path)
        directory = path if path.is_dir() else path.parent
        gen_file = directory / "generation_config.json"
        gen = json.loads(gen_file.read_text()) if gen_file.exists() else None
        return cls.from_dict(read_config_json(path), gen)

    def replace(self, **kw) -> BartConfig:
        return dataclasses.replace(self, **kw)


def _dense(c: BartConfig, features: int, name: str, dtype, param_dtype) -> nn.Dense:
    return blocks.dense(features, c.init_std, name, dtype, param_dtype)


def _norm(name: str, dtype, param_dtype) -> nn.LayerNorm:
    return nn.LayerNorm(1e-5, dtype=dtype, param_dtype=param_dtype, name=name)


class Attention(Block):
    """HF's ``BartAttention``: ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (with biases)."""

    @nn.compact
    def __call__(self, x, kv, heads: int, mask=None, causal=False, cache=None, index=None):
        """``(out, cache)``. ``kv``: the keys' source (``x`` itself for self-attention);
        ``heads``: the stack's head count; ``mask``: ``(batch, keys)`` real keys (with a cache:
        over the buffer). With a `KVCache` (one layer's ``(batch, S, heads, head_dim)``) the
        new keys and values are written at slots ``index ..`` and every query sees the slots
        up to its own."""
        c, dt, pdt = self.config, self.dtype, self.param_dtype
        b, t, d = x.shape
        n = heads
        h = d // n
        q = _dense(c, d, "q_proj", dt, pdt)(x).reshape(b, t, n, h)
        k = _dense(c, d, "k_proj", dt, pdt)(kv).reshape(b, kv.shape[1], n, h)
        v = _dense(c, d, "v_proj", dt, pdt)(kv).reshape(b, kv.shape[1], n, h)
        m = None if mask is None else mask[:, None, None, :]
        if cache is not None:
            keys, values = cache
            start = (0, index, 0, 0)
            k = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), start)
            v = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), start)
            cache = KVCache(k, v)
            allowed = jnp.arange(k.shape[1])[None, :] <= index + jnp.arange(t)[:, None]
            m = allowed[None, None] if m is None else (m & allowed[None, None])
            k, v, causal = k.astype(q.dtype), v.astype(q.dtype), False
        out = blocks.attend(
            q,
            k,
            v,
            m,
            rate=c.attention_dropout,
            deterministic=self.deterministic,
            causal=causal,
            impl=self.attention_impl,
        )
        out = nn.with_logical_constraint(out.reshape(b, t, d), ("batch", "length", "heads"))
        return _dense(c, d, "out_proj", dt, pdt)(out), cache


class EncoderLayer(Block):
    """HF's ``BartEncoderLayer``: self-attention and the FFN, post-LN."""

    @nn.compact
    def __call__(self, x, mask):
        """``(x, None)``: also ``nn.scan``'s body."""
        c, dt, pdt, det = self.config, self.dtype, self.param_dtype, self.deterministic
        drop = nn.Dropout(c.dropout)
        attn = Attention(c, name="self_attn", **self.block_kwargs())
        a, _ = attn(x, x, c.encoder_attention_heads, mask)
        x = _norm("self_attn_layer_norm", dt, pdt)(x + drop(a, deterministic=det))
        x = _norm("final_layer_norm", dt, pdt)(x + _ffn(self, c.encoder_ffn_dim, x))
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


def _ffn(layer: nn.Module, ffn_dim: int, x):
    """``dropout(fc2(dropout_act(act(fc1(x)))))`` in ``layer``'s scope (``fc1``, ``fc2``)."""
    c, dt, pdt, det = layer.config, layer.dtype, layer.param_dtype, layer.deterministic
    h = blocks.activation(c.activation_function)(_dense(c, ffn_dim, "fc1", dt, pdt)(x))
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = nn.Dropout(c.activation_dropout)(h, deterministic=det)
    h = _dense(c, c.d_model, "fc2", dt, pdt)(h)
    return nn.Dropout(c.dropout)(h, deterministic=det)


class DecoderLayer(Block):
    """HF's ``BartDecoderLayer``: causal self-attention, cross-attention, the FFN."""

    @nn.compact
    def __call__(self, x, mask, enc, enc_mask, cache=None, index=None):
        """``(x, cache)``: causal self-attention (``mask``: real decoder tokens, over the cache
        buffer when there is one), cross-attention to ``enc``, the FFN; also the scan body."""
        c, dt, pdt, det = self.config, self.dtype, self.param_dtype, self.deterministic
        drop = nn.Dropout(c.dropout)
        n = c.decoder_attention_heads
        kw = self.block_kwargs()
        a, cache = Attention(c, name="self_attn", **kw)(x, x, n, mask, True, cache, index)
        x = _norm("self_attn_layer_norm", dt, pdt)(x + drop(a, deterministic=det))
        a, _ = Attention(c, name="encoder_attn", **kw)(x, enc, n, enc_mask)
        x = _norm("encoder_attn_layer_norm", dt, pdt)(x + drop(a, deterministic=det))
        x = _norm("final_layer_norm", dt, pdt)(x + _ffn(self, c.decoder_ffn_dim, x))
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), cache


def _embed(module: nn.Module, tokens, positions):
    """Token embeddings (``shared``, scaled) + learned positions, LayerNorm, dropout, in
    ``module``'s scope (``embed_positions``, ``layernorm_embedding``, as HF names them)."""
    c, dt, pdt = module.config, module.dtype, module.param_dtype
    slots = c.max_position_embeddings + POSITION_OFFSET
    table = blocks.embed(slots, c.d_model, c.init_std, "embed_positions", dt, pdt)
    pos = table(positions + POSITION_OFFSET)
    x = _norm("layernorm_embedding", dt, pdt)(tokens + pos)
    x = nn.Dropout(c.dropout)(x, deterministic=module.deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class Encoder(Stack):
    """HF's ``model/encoder``: positions, ``layernorm_embedding``, ``layers``."""

    @nn.compact
    def __call__(self, tokens, mask):
        x = _embed(self, tokens, jnp.arange(tokens.shape[1])[None, :])
        n = self.config.encoder_layers
        layers = blocks.layer_stack(self, EncoderLayer, n, (nn.broadcast,), "layers")
        return layers(x, mask)[0]


class Decoder(Stack):
    """HF's ``model/decoder``: as the encoder, positions counted from ``index``."""

    @nn.compact
    def __call__(self, tokens, mask, enc, enc_mask, cache=None, index=None):
        t = tokens.shape[1]
        start = 0 if index is None else index
        x = _embed(self, tokens, start + jnp.arange(t)[None, :])
        # the cache is scanned over with the layers (axis 0), the rest broadcast
        in_axes = (nn.broadcast,) * 3 + (0, nn.broadcast)
        n = self.config.decoder_layers
        layers = blocks.layer_stack(self, DecoderLayer, n, in_axes, "layers")
        if self.scan_layers:
            return layers(x, mask, enc, enc_mask, cache, index)
        return layers(x, mask, enc, enc_mask, cache=cache, index=index)


class Seq2SeqLM(Stack):
    """HF's ``BartForConditionalGeneration``: logits ``(batch, target length, vocab)``."""

    def setup(self):
        check_remat(self.remat)
        c = self.config
        self.model = _BartModel(c, **self.stack_kwargs())
        self.final_logits_bias = self.param(
            "final_logits_bias", nn.initializers.zeros, (1, c.vocab_size), self.param_dtype
        )

    def __call__(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None):
        enc = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, enc, attention_mask, decoder_attention_mask)[0]

    def encode(self, input_ids, attention_mask=None):
        """The encoder's last hidden states ``(batch, source length, d_model)``."""
        mask = None if attention_mask is None else attention_mask.astype(bool)
        return self.model.encoder(self.model.embed(input_ids), mask)

    def decode(self, tokens, enc, enc_mask=None, mask=None, cache=None, index=None):
        """``(logits, cache)`` for decoder ``tokens`` (at buffer slots ``index ..`` with a
        `KVCache` of all decoder layers; ``mask`` then spans the buffer)."""
        enc_mask = None if enc_mask is None else enc_mask.astype(bool)
        mask = None if mask is None else mask.astype(bool)
        x, cache = self.model.decoder(self.model.embed(tokens), mask, enc, enc_mask, cache, index)
        logits = self.model.shared.attend(x) + self.final_logits_bias.astype(x.dtype)
        return logits, cache


class _BartModel(Stack):
    """HF's ``model``: the ``shared`` embedding, the encoder and the decoder."""

    def setup(self):
        c = self.config
        dt, pdt = self.dtype, self.param_dtype
        self.shared = blocks.embed(c.vocab_size, c.d_model, c.init_std, None, dt, pdt)
        self.encoder = Encoder(c, **self.stack_kwargs())
        self.decoder = Decoder(c, **self.stack_kwargs())

    def embed(self, ids):
        scale = math.sqrt(self.config.d_model) if self.config.scale_embedding else 1.0
        return self.shared(ids) * scale

    def __call__(self, input_ids, decoder_input_ids):  # for init only
        enc = self.encoder(self.embed(input_ids), None)
        return self.decoder(self.embed(decoder_input_ids), None, enc, None)
