"""Linen modules of the LLaMA family (LLaMA 2/3/3.1/3.2, Mistral, Qwen2/2.5).

Param paths mirror HF's Flax LLaMA (``model/embed_tokens/embedding``,
``model/layers/<i>/self_attn/q_proj/kernel``, ``model/layers/<i>/mlp/down_proj/kernel``,
``model/norm/weight``, ``lm_head/kernel``), and every projection is a plain ``nn.Dense``, so
`aroma_jax.core.inject` (``flax.linen.intercept_methods``), the target presets (``q_proj``, ...)
and the sharding rules apply unchanged.

* Attention is ``jax.nn.dot_product_attention`` (cuDNN flash attention on GPUs where available,
  XLA elsewhere) with ``is_causal`` and a ``(batch, 1, 1, keys)`` padding mask: no
  ``(max_pos, max_pos)`` buffer, and grouped-query attention without repeating k/v heads.
  Mistral's sliding window is the kernel's ``local_window_size``.
* ``remat``: ``none`` | ``full`` (recompute each layer in the backward pass) | ``dots`` (save
  matmul outputs without batch dims: jax's ``dots_with_no_batch_dims_saveable``).
* Activations carry logical-axis constraints (``batch``, ``length``, ``embed``); they are no-ops
  unless a mesh and `aroma_jax.models.native.partitioning` rules are active.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from aroma_jax.models.native.config import NativeConfig
    >>> cfg = NativeConfig.from_dict({"model_type": "llama", "vocab_size": 32, "hidden_size": 16,
    ...     "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4})
    >>> m = CausalLM(cfg)
    >>> ids = jnp.zeros((1, 5), jnp.int32)
    >>> p = m.init(jax.random.key(0), ids)["params"]
    >>> m.apply({"params": p}, ids).shape
    (1, 5, 32)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aroma_jax.models.native.config import NativeConfig
from aroma_jax.models.native.rope import apply_rotary, inv_frequencies

REMAT_POLICIES = ("none", "full", "dots")


def _remat_policy(name: str):
    if name == "full":
        return None  # save nothing: recompute the whole layer
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    raise ValueError(f"remat {name!r} is not supported: accepted {REMAT_POLICIES}")


def _constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    return nn.with_logical_constraint(x, names)


class RMSNorm(nn.Module):
    """``w * x / rms(x)`` with the statistics in fp32 (as HF's LLaMA), param ``weight``."""

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return w.astype(self.dtype) * y.astype(self.dtype)


def _dense(cfg: NativeConfig, features: int, bias: bool, name: str | None, dtype, param_dtype):
    return nn.Dense(
        features,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.initializers.normal(cfg.initializer_range),
        name=name,
    )


class Attention(nn.Module):
    config: NativeConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str | None = None  # None: cuDNN where available, else XLA

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array | None) -> jax.Array:
        c, dt, pdt = self.config, self.dtype, self.param_dtype
        b, t, _ = x.shape
        n, k, h = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = _dense(c, n * h, c.qkv_bias, "q_proj", dt, pdt)(x).reshape(b, t, n, h)
        kk = _dense(c, k * h, c.qkv_bias, "k_proj", dt, pdt)(x).reshape(b, t, k, h)
        v = _dense(c, k * h, c.qkv_bias, "v_proj", dt, pdt)(x).reshape(b, t, k, h)
        inv = inv_frequencies(h, c.rope_theta, c.rope)
        q, kk = apply_rotary(q, positions, inv), apply_rotary(kk, positions, inv)
        window = (c.sliding_window - 1, 0) if c.sliding_window else None
        out = jax.nn.dot_product_attention(
            q,
            kk,
            v,
            mask=None if mask is None else mask[:, None, None, :],
            is_causal=True,
            local_window_size=window,
            implementation=self.attention_impl,
        )
        return _dense(c, c.hidden_size, c.o_bias, "o_proj", dt, pdt)(out.reshape(b, t, n * h))


class MLP(nn.Module):
    config: NativeConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, dt, pdt = self.config, self.dtype, self.param_dtype
        gate = _dense(c, c.intermediate_size, c.mlp_bias, "gate_proj", dt, pdt)(x)
        up = _dense(c, c.intermediate_size, c.mlp_bias, "up_proj", dt, pdt)(x)
        h = _constrain(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return _dense(c, c.hidden_size, c.mlp_bias, "down_proj", dt, pdt)(h)


class DecoderLayer(nn.Module):
    config: NativeConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, positions, mask):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(c.rms_norm_eps, name="input_layernorm", **kw)(x)
        x = x + Attention(c, attention_impl=self.attention_impl, name="self_attn", **kw)(
            h, positions, mask
        )
        h = RMSNorm(c.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        x = x + MLP(c, name="mlp", **kw)(h)
        return _constrain(x, ("batch", "length", "embed"))


class Layers(nn.Module):
    """The decoder layers, named ``0 .. L-1`` under ``layers`` as in HF's Flax tree."""

    config: NativeConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, positions, mask):
        cls = DecoderLayer
        if self.remat != "none":
            cls = nn.remat(DecoderLayer, policy=_remat_policy(self.remat), prevent_cse=True)
        for i in range(self.config.num_hidden_layers):
            x = cls(
                self.config,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                attention_impl=self.attention_impl,
                name=str(i),
            )(x, positions, mask)
        return x


class Model(nn.Module):
    config: NativeConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    attention_impl: str | None = None

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            embedding_init=nn.initializers.normal(c.initializer_range),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.layers = Layers(
            c, self.dtype, self.param_dtype, remat=self.remat, attention_impl=self.attention_impl
        )
        self.norm = RMSNorm(c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        mask = None if attention_mask is None else attention_mask.astype(bool)
        x = _constrain(self.embed_tokens(input_ids), ("batch", "length", "embed"))
        x = self.layers(x, position_ids, mask)
        return self.norm(x)


class CausalLM(nn.Module):
    """Logits ``(batch, seq, vocab)``; a tied model reads them off the embedding matrix."""

    config: NativeConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    attention_impl: str | None = None

    def setup(self):
        c = self.config
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat {self.remat!r} is not supported: accepted {REMAT_POLICIES}")
        self.model = Model(c, self.dtype, self.param_dtype, self.remat, self.attention_impl)
        if not c.tie_word_embeddings:
            self.lm_head = _dense(c, c.vocab_size, False, None, self.dtype, self.param_dtype)

    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        hidden = self.model(input_ids, attention_mask, position_ids)
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.attend(hidden)
        return self.lm_head(hidden)
