"""Linen pieces the post-LN families share: BERT / RoBERTa (`bert`) and BART (`bart`).

HF's activations by name, the normal-initialised ``Dense`` and ``Embed``, attention with
attention-probability dropout, and a stack of layers (unrolled ``0 .. n-1`` or under
``nn.scan``). Every piece is built in the calling module's scope under the name the caller
gives, so the param paths stay HF's (``attention/self/query``, ``self_attn/q_proj``, ...).

Example:
    >>> import jax, jax.numpy as jnp
    >>> q = jnp.ones((1, 3, 2, 4))
    >>> attend(q, q, q, None, rate=0.0, deterministic=True).shape
    (1, 3, 2, 4)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aroma_jax.models.native.config import NativeConfigError
from aroma_jax.models.native.modeling import remat_policy


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


# HF's ACT2FN names -> functions (exact erf GELU for "gelu", the tanh form for the others)
ACTIVATIONS: dict[str, Callable] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable:
    """The function HF's ``ACT2FN[name]`` computes."""
    if name not in ACTIVATIONS:
        raise NativeConfigError(
            f"hidden_act {name!r} is not supported: accepted {sorted(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]


def dense(features: int, std: float, name: str | None, dtype: Any, param_dtype: Any) -> nn.Dense:
    """A biased ``Dense`` with HF's ``normal(std)`` kernel init."""
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.initializers.normal(std),
        name=name,
    )


def embed(num: int, features: int, std: float, name: str | None, dtype: Any, param_dtype: Any):
    """An ``Embed`` with HF's ``normal(std)`` init."""
    return nn.Embed(
        num,
        features,
        embedding_init=nn.initializers.normal(std),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    *,
    rate: float,
    deterministic: bool,
    causal: bool = False,
    impl: str | None = None,
) -> jax.Array:
    """``softmax(q k^T / sqrt(h)) v`` over ``(batch, t, heads, head_dim)`` inputs; ``mask``
    broadcasts to ``(batch, heads, queries, keys)`` (True: attend), ``causal`` adds the lower
    triangle. ``jax.nn.dot_product_attention`` runs it, except while training with a dropout
    ``rate`` on the probabilities, which that kernel cannot apply: then the plain
    einsum/softmax path runs, its ``Dropout`` in the calling module's scope."""
    if deterministic or rate == 0.0:
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=causal, implementation=impl
        )
    s = jnp.einsum("bqnh,bknh->bnqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
    if causal:
        tri = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None, None]
        mask = tri if mask is None else (mask & tri)
    if mask is not None:
        s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    p = nn.Dropout(rate)(jax.nn.softmax(s, axis=-1), deterministic=False)
    return jnp.einsum("bnqk,bknh->bqnh", p.astype(v.dtype), v)


class Block(nn.Module):
    """The fields every BERT / BART module has, in this order (positional construction keeps
    it): its config, compute and param dtypes, whether dropout is off, the attention kernel
    (``None``: cuDNN where available, else XLA). A subclass adds its own fields after these."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    deterministic: bool = True
    attention_impl: str | None = None

    def block_kwargs(self) -> dict[str, Any]:
        """These fields but the config, as keywords: a child `Block` built the same way."""
        return dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            deterministic=self.deterministic,
            attention_impl=self.attention_impl,
        )


class Stack(Block):
    """A `Block` that holds layers: how they are rematerialised (``none`` | ``full`` |
    ``dots``) and whether they run under ``nn.scan`` (`layer_stack`)."""

    remat: str = "none"
    scan_layers: bool = False

    def stack_kwargs(self) -> dict[str, Any]:
        """`block_kwargs` with ``remat`` and ``scan_layers``: a child `Stack` built the same
        way."""
        return dict(self.block_kwargs(), remat=self.remat, scan_layers=self.scan_layers)


def _rematted(layer_cls: Any, remat: str, scanned: bool) -> Any:
    if remat == "none":
        return layer_cls
    # flax: prevent_cse=False under scan (the loop already blocks CSE)
    return nn.remat(layer_cls, policy=remat_policy(remat), prevent_cse=not scanned)


class Unrolled(nn.Module):
    """``n`` layers named ``0 .. n-1`` (HF's ``layer/<i>``, ``layers/<i>``), each built as
    ``make_layer(name=...)`` and called ``(x, *args) -> (x, cache)``. With a ``cache`` of all
    layers (leading layer axis, a `aroma_jax.models.native.modeling.KVCache`) each layer gets
    its slice and ``index``, and the new slices come back stacked; without one, ``(x, None)``."""

    make_layer: Callable[..., nn.Module]
    n: int

    @nn.compact
    def __call__(self, x, *args, cache=None, index=None):
        new = []
        for i in range(self.n):
            layer = self.make_layer(name=str(i))
            if cache is None:
                x, _ = layer(x, *args)
                continue
            x, layer_cache = layer(x, *args, jax.tree.map(lambda a, i=i: a[i], cache), index)
            new.append(layer_cache)
        if cache is None:
            return x, None
        return x, jax.tree.map(lambda *cs: jnp.stack(cs), *new)


def layer_stack(module: Stack, layer_cls: Any, n: int, in_axes: tuple, name: str) -> nn.Module:
    """``module``'s ``n`` layers of ``layer_cls`` under ``name``: `Unrolled`, or with
    ``module.scan_layers`` one ``nn.scan`` module (params stacked on axis 0, one dropout RNG
    per layer, the other inputs as ``in_axes`` says). Both are called ``(x, *args)``; the
    unrolled stack takes a cache as ``cache=``, ``index=``. The layer class is built as
    ``(config, dtype, param_dtype, deterministic, attention_impl)`` from ``module``'s fields,
    with its ``remat``."""
    cls = _rematted(layer_cls, module.remat, scanned=module.scan_layers)
    kw = module.block_kwargs()
    if not module.scan_layers:
        return Unrolled(functools.partial(cls, module.config, **kw), n, name=name)
    scanned = nn.scan(
        cls,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=in_axes,
        length=n,
    )
    return scanned(module.config, name=name, **kw)

