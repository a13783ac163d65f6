"""Linen modules of the LLaMA family (LLaMA 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, Gemma 3 text).

Param paths mirror HF's Flax LLaMA (``model/embed_tokens/embedding``,
``model/layers/<i>/self_attn/q_proj/kernel``, ``model/layers/<i>/mlp/down_proj/kernel``,
``model/norm/weight``, ``lm_head/kernel``), and every projection is a plain ``nn.Dense``, so
`aroma_jax.core.inject` (``flax.linen.intercept_methods``), the target presets (``q_proj``, ...)
and the sharding rules apply unchanged.

* Attention is ``jax.nn.dot_product_attention`` (cuDNN flash attention on GPUs where available,
  XLA elsewhere) with ``is_causal`` and a ``(batch, 1, 1, keys)`` padding mask: no
  ``(max_pos, max_pos)`` buffer, and grouped-query attention without repeating k/v heads.
  Mistral's sliding window is the kernel's ``local_window_size``. Gemma 3 mixes sliding and
  global layers (`NativeConfig.sliding_layers`), each kind with its own rotary base; a scanned
  stack of mixed layers reads the kind per layer as a scanned input and builds the mask from
  it.
* Qwen3 and Gemma 3 normalise queries and keys per head (``self_attn/q_norm``, ``k_norm``);
  Gemma's norms scale by ``1 + w``, sit around both sublayers (``pre_feedforward_layernorm``,
  ``post_feedforward_layernorm``), its MLP is GeGLU, its embeddings are scaled by
  ``sqrt(hidden_size)`` and its logits soft-capped where ``final_logit_softcapping`` is set.
* ``remat``: ``none`` | ``full`` (recompute each layer in the backward pass) | ``dots`` (save
  matmul outputs without batch dims: jax's ``dots_with_no_batch_dims_saveable``).
* ``scan_layers``: run the decoder layers under ``flax.linen.scan`` (one layer traced once).
  Every layer leaf then lives at ``model/layers/<sub-path>/<leaf>`` with a leading layer axis,
  e.g. ``model/layers/self_attn/q_proj/kernel (L, in, out)``; any extra leaf in a module's
  scope there (an adapter factor ``(L, in, r)``) is sliced per layer like the kernel.
  `stack_layers` / `unstack_layers` convert between the two layouts.
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

from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aroma_jax.models.native.config import NativeConfig
from aroma_jax.models.native.rope import apply_rotary, inv_frequencies

REMAT_POLICIES = ("none", "full", "dots")
LAYERS_PATH = ("model", "layers")  # where the decoder layers live in the param tree


class KVCache(NamedTuple):
    """Every layer's attention keys and values, ``(layers, batch, slots, kv_heads, head_dim)``:
    a fixed-size buffer that decoding fills slot by slot (`CausalLM` with ``cache=``)."""

    keys: jax.Array
    values: jax.Array


def init_cache(config: NativeConfig, batch: int, slots: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty `KVCache` for ``batch`` sequences of up to ``slots`` tokens."""
    shape = (config.num_hidden_layers, batch, slots, config.num_key_value_heads, config.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def remat_policy(name: str):
    if name == "full":
        return None  # save nothing: recompute the whole layer
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    raise ValueError(f"remat {name!r} is not supported: accepted {REMAT_POLICIES}")


def check_remat(name: str) -> None:
    """Rejects a ``remat`` setting other than `REMAT_POLICIES` (a module's setup checks it)."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat {name!r} is not supported: accepted {REMAT_POLICIES}")


def _constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    return nn.with_logical_constraint(x, names)


class RMSNorm(nn.Module):
    """``w * x / rms(x)`` with the statistics in fp32 (as HF's LLaMA), param ``weight``;
    ``plus_one``: Gemma's ``(1 + w) * x / rms(x)``, all in fp32, with ``w`` initialised at 0."""

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    plus_one: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        w = self.param("weight", init, (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return ((1.0 + w.astype(jnp.float32)) * y).astype(self.dtype)
        return w.astype(self.dtype) * y.astype(self.dtype)


def _norm(cfg: NativeConfig, name: str, dtype, param_dtype) -> RMSNorm:
    return RMSNorm(cfg.rms_norm_eps, dtype, param_dtype, cfg.norm_plus_one, name=name)


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
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array | None,
        cache: KVCache | None = None,
        index: jax.Array | None = None,
        sliding: bool | jax.Array = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """``(out, cache)``. Without ``cache``: causal self-attention over ``x``, ``mask (batch,
        t)`` marking real tokens, and ``None`` back. With one layer's `KVCache` (keys and values
        ``(batch, S, kv_heads, head_dim)``): ``x`` holds the tokens at buffer slots ``index ..
        index + t - 1``; their keys and values are written there and the queries attend to
        every slot up to their own that ``mask (batch, S)`` marks. ``sliding``: this layer
        attends within ``sliding_window`` (a Python bool, or a traced one in a scanned stack of
        mixed layers)."""
        c, dt, pdt = self.config, self.dtype, self.param_dtype
        b, t, _ = x.shape
        n, k, h = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = _dense(c, n * h, c.qkv_bias, "q_proj", dt, pdt)(x).reshape(b, t, n, h)
        kk = _dense(c, k * h, c.qkv_bias, "k_proj", dt, pdt)(x).reshape(b, t, k, h)
        v = _dense(c, k * h, c.qkv_bias, "v_proj", dt, pdt)(x).reshape(b, t, k, h)
        if c.qk_norm:
            q, kk = _norm(c, "q_norm", dt, pdt)(q), _norm(c, "k_norm", dt, pdt)(kk)
        static = isinstance(sliding, bool)
        if static:
            inv = inv_frequencies(h, *c.rotary(sliding))
        else:
            local, full = (inv_frequencies(h, *c.rotary(s)) for s in (True, False))
            inv = jnp.where(sliding, local, full)
        q, kk = apply_rotary(q, positions, inv), apply_rotary(kk, positions, inv)
        o_proj = _dense(c, c.hidden_size, c.o_bias, "o_proj", dt, pdt)
        if cache is None and static:
            window = (c.sliding_window - 1, 0) if sliding else None
            out = jax.nn.dot_product_attention(
                q,
                kk,
                v,
                mask=None if mask is None else mask[:, None, None, :],
                is_causal=True,
                local_window_size=window,
                scale=c.query_scale,
                implementation=self.attention_impl,
            )
            return o_proj(out.reshape(b, t, n * h)), None
        if cache is None:  # a traced layer kind: the window mask written out
            q_at, k_at = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
            allowed = self._allowed(q_at, k_at, sliding)
            if mask is not None:
                allowed = allowed & mask[:, None, None, :]
            out = self._attend(q, kk, v, allowed)
            return o_proj(out.reshape(b, t, n * h)), None
        keys, values = cache
        start = (0, index, 0, 0)
        keys = jax.lax.dynamic_update_slice(keys, kk.astype(keys.dtype), start)
        values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), start)
        slots = keys.shape[1]
        q_at = index + jnp.arange(t)[:, None]  # (t, 1) buffer slots of the queries
        k_at = jnp.arange(slots)[None, :]  # (1, S)
        allowed = self._allowed(q_at, k_at, sliding)
        if mask is not None:
            allowed = allowed & mask[:, None, None, :]
        out = self._attend(q, keys.astype(q.dtype), values.astype(q.dtype), allowed)
        return o_proj(out.reshape(b, t, n * h)), KVCache(keys, values)

    def _allowed(self, q_at: jax.Array, k_at: jax.Array, sliding) -> jax.Array:
        """``(1, 1, t, S)``: causal over positions, and within the window on a sliding layer."""
        allowed = k_at <= q_at  # causal, as `is_causal`
        if self.config.sliding_window:
            allowed = allowed & ~(sliding & (q_at - k_at >= self.config.sliding_window))
        return allowed[None, None]

    def _attend(self, q, k, v, allowed):
        c = self.config
        return jax.nn.dot_product_attention(
            q, k, v, mask=allowed, scale=c.query_scale, implementation=self.attention_impl
        )


class MLP(nn.Module):
    config: NativeConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, dt, pdt = self.config, self.dtype, self.param_dtype
        gate = _dense(c, c.intermediate_size, c.mlp_bias, "gate_proj", dt, pdt)(x)
        up = _dense(c, c.intermediate_size, c.mlp_bias, "up_proj", dt, pdt)(x)
        act = nn.silu(gate) if c.activation == "silu" else nn.gelu(gate, approximate=True)
        h = _constrain(act * up, ("batch", "length", "mlp"))
        return _dense(c, c.hidden_size, c.mlp_bias, "down_proj", dt, pdt)(h)


class DecoderLayer(nn.Module):
    config: NativeConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str | None = None
    sliding: bool | None = None  # static layer kind (unrolled stacks; not traced under remat)

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, index=None, sliding=None):
        """``(x, cache)`` with this layer's `KVCache` or ``None`` (see `Attention`). The
        signature is also ``nn.scan``'s body: ``(carry, *inputs) -> (carry, output)``.
        ``sliding``: the layer kind, traced (see `Attention`); ``None``: the module's static
        ``sliding`` (an unrolled layer), else the config's only kind."""
        c, dt, pdt = self.config, self.dtype, self.param_dtype
        if sliding is None:
            sliding = c.is_sliding(0) if self.sliding is None else self.sliding
        h = _norm(c, "input_layernorm", dt, pdt)(x)
        attn = Attention(c, dt, pdt, attention_impl=self.attention_impl, name="self_attn")
        a, cache = attn(h, positions, mask, cache, index, sliding)
        if c.sandwich_norm:  # Gemma: the attention output is normalised before the residual
            a = _norm(c, "post_attention_layernorm", dt, pdt)(a)
        x = x + a
        pre = "pre_feedforward_layernorm" if c.sandwich_norm else "post_attention_layernorm"
        m = MLP(c, dt, pdt, name="mlp")(_norm(c, pre, dt, pdt)(x))
        if c.sandwich_norm:
            m = _norm(c, "post_feedforward_layernorm", dt, pdt)(m)
        return _constrain(x + m, ("batch", "length", "embed")), cache


class Layers(nn.Module):
    """The decoder layers, named ``0 .. L-1`` under ``layers`` as in HF's Flax tree."""

    config: NativeConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, index=None, sliding=None):
        """``(x, cache)``: the `KVCache` of all layers updated, or ``None`` without one.
        ``sliding`` is ignored: each unrolled layer knows its kind statically."""
        cls = DecoderLayer
        if self.remat != "none":
            cls = nn.remat(DecoderLayer, policy=remat_policy(self.remat), prevent_cse=True)
        new = []
        for i in range(self.config.num_hidden_layers):
            layer = cls(
                self.config,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                attention_impl=self.attention_impl,
                sliding=self.config.is_sliding(i),
                name=str(i),
            )
            layer_cache = None if cache is None else jax.tree.map(lambda c, i=i: c[i], cache)
            x, layer_cache = layer(x, positions, mask, layer_cache, index)
            new.append(layer_cache)
        if cache is None:
            return x, None
        return x, jax.tree.map(lambda *cs: jnp.stack(cs), *new)


def layer_kinds(config: NativeConfig) -> jax.Array | None:
    """``(L,)`` bools, True on sliding layers, for a scanned stack of mixed layers; ``None``
    when every layer is of one kind (the layer then reads it from the config, statically)."""
    if not config.mixed_layers:
        return None
    return jnp.asarray([config.is_sliding(i) for i in range(config.num_hidden_layers)])


def scanned_layers(
    config: NativeConfig,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    remat: str = "none",
    attention_impl: str | None = None,
    name: str | None = None,
) -> nn.Module:
    """The ``L`` decoder layers as one ``nn.scan`` module: params stacked on axis 0, one RNG
    split per layer, positions and mask broadcast, the hidden state the carry.

    Called as ``(x, positions, mask, cache, index, sliding) -> (x, new cache)`` (``cache`` a
    `KVCache` of all layers or ``None``, then ``None`` back; ``sliding`` the ``(L,)`` layer
    kinds of a mixed stack, else ``None``: `layer_kinds`). Assign it to ``self.layers`` (or pass
    ``name="layers"``) so its Dense modules sit at ``.../layers/self_attn/q_proj``.
    """
    cls = DecoderLayer
    if remat != "none":  # flax: prevent_cse=False under scan (the loop already blocks CSE)
        cls = nn.remat(cls, policy=remat_policy(remat), prevent_cse=False)
    scan = nn.scan(
        cls,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, 0),
        length=config.num_hidden_layers,
    )
    return scan(
        config, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, name=name
    )


class Model(nn.Module):
    config: NativeConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    attention_impl: str | None = None
    scan_layers: bool = False

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            embedding_init=nn.initializers.normal(c.initializer_range),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        if self.scan_layers:
            self.layers = scanned_layers(
                c, self.dtype, self.param_dtype, self.remat, self.attention_impl
            )
        else:
            self.layers = Layers(
                c,
                self.dtype,
                self.param_dtype,
                remat=self.remat,
                attention_impl=self.attention_impl,
            )
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, c.norm_plus_one)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None, index=None):
        c = self.config
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        mask = None if attention_mask is None else attention_mask.astype(bool)
        x = self.embed_tokens(input_ids)
        if c.embed_scale:  # the scale rounded to the weights' dtype first, as transformers
            x = x * jnp.asarray(jnp.asarray(c.hidden_size**0.5, self.param_dtype), x.dtype)
        x = _constrain(x, ("batch", "length", "embed"))
        kinds = layer_kinds(c) if self.scan_layers else None
        x, cache = self.layers(x, position_ids, mask, cache, index, kinds)
        return self.norm(x), cache


class CausalLM(nn.Module):
    """Logits ``(batch, seq, vocab)``; a tied model reads them off the embedding matrix.

    ``scan_layers=True`` runs the layers under ``nn.scan`` (params in the stacked layout of
    `stack_layers`); the default unrolls them (``model/layers/<i>/...``).
    """

    config: NativeConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    attention_impl: str | None = None
    scan_layers: bool = False

    def setup(self):
        c = self.config
        check_remat(self.remat)
        self.model = Model(
            c, self.dtype, self.param_dtype, self.remat, self.attention_impl, self.scan_layers
        )
        if not c.tie_word_embeddings:
            self.lm_head = _dense(c, c.vocab_size, False, None, self.dtype, self.param_dtype)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None, index=None):
        """Logits; with a `KVCache` (see `init_cache`), ``(logits, new_cache)`` for the tokens at
        buffer slots ``index ..`` with ``attention_mask`` over the whole buffer."""
        hidden, new_cache = self.model(input_ids, attention_mask, position_ids, cache, index)
        if self.config.tie_word_embeddings:
            logits = self.model.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        cap = self.config.final_softcap
        if cap is not None:
            logits = cap * jnp.tanh(logits / cap)
        return logits if cache is None else (logits, new_cache)


# ---------------------------------------------------------------------------- layouts
def _stack(leaves: list) -> Any:
    """``np.stack`` for numpy leaves, ``jnp.stack`` for jax arrays."""
    if all(isinstance(x, np.ndarray) for x in leaves):
        return np.stack(leaves)
    return jnp.stack(leaves)


def _get_path(tree: Mapping, path: tuple[str, ...]) -> Any:
    for k in path:
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _set_path(tree: Mapping, path: tuple[str, ...], value: Any) -> dict:
    """A copy of ``tree`` (dicts along ``path`` only; other subtrees shared) with ``value``."""
    out = dict(tree)
    out[path[0]] = value if len(path) == 1 else _set_path(tree[path[0]], path[1:], value)
    return out


def is_scanned(params: Mapping, at: tuple[str, ...] = LAYERS_PATH) -> bool:
    """Whether ``params`` holds its layers in the stacked (scanned) layout: ``model/layers``
    (or ``at``) exists and none of its keys is a layer index."""
    layers = _get_path(params, at)
    return isinstance(layers, Mapping) and not any(str(k).isdigit() for k in layers)


def stack_layers(params: Mapping, num_layers: int, at: tuple[str, ...] = LAYERS_PATH) -> dict:
    """The unrolled tree (``model/layers/<i>/...``) in the scanned layout: every layer leaf,
    extra leaves such as adapter factors included, becomes ``model/layers/<sub-path>`` with a
    leading axis of length ``num_layers`` (``np.stack`` / ``jnp.stack`` in layer order). Other
    leaves are shared, not copied.

    Example:
        >>> p = {"model": {"layers": {str(i): {"w": np.full(2, i)} for i in range(3)}}}
        >>> stack_layers(p, 3)["model"]["layers"]["w"].tolist()
        [[0, 0], [1, 1], [2, 2]]
    """
    if num_layers < 1:
        raise ValueError(f"stack_layers: num_layers must be >= 1, got {num_layers}")
    layers = _get_path(params, at)
    want = [str(i) for i in range(num_layers)]
    if not isinstance(layers, Mapping) or sorted(layers, key=str) != sorted(want):
        found = sorted(layers, key=str) if isinstance(layers, Mapping) else None
        raise ValueError(
            f"stack_layers: expected layers {want[:3]}...{want[-1:]} under "
            f"{'/'.join(at)}, found {found}"
        )
    first = jax.tree.structure(layers["0"])
    for i in want[1:]:
        if jax.tree.structure(layers[i]) != first:
            raise ValueError(f"stack_layers: layer {i} has other leaves than layer 0")
    stacked = jax.tree.map(lambda *xs: _stack(list(xs)), *(layers[i] for i in want))
    return _set_path(params, at, stacked)


def unstack_layers(params: Mapping, at: tuple[str, ...] = LAYERS_PATH) -> dict:
    """The inverse of `stack_layers`: ``model/layers/<sub-path>`` leaves of shape ``(L, ...)``
    become ``model/layers/<i>/<sub-path>`` (views ``leaf[i]``). Other leaves are shared.

    Example:
        >>> p = {"model": {"layers": {"w": np.arange(4).reshape(2, 2)}}, "lm_head": 1}
        >>> u = unstack_layers(p)
        >>> sorted(u["model"]["layers"]), u["model"]["layers"]["1"]["w"].tolist(), u["lm_head"]
        (['0', '1'], [2, 3], 1)
    """
    if not is_scanned(params, at):
        raise ValueError(f"unstack_layers: no stacked layers under {'/'.join(at)}")
    layers = _get_path(params, at)
    lengths = {int(x.shape[0]) for x in jax.tree.leaves(layers)}
    if len(lengths) != 1:
        raise ValueError(f"unstack_layers: stacked leaves disagree on the layer count {lengths}")
    (n,) = lengths
    unrolled = {str(i): jax.tree.map(lambda x, i=i: x[i], layers) for i in range(n)}
    return _set_path(params, at, unrolled)
