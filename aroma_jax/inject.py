"""Adding adapter outputs to matched Dense calls of any ``flax.linen`` model.

`flax.linen.intercept_methods` lets us wrap every ``Dense.__call__`` and ``DenseGeneral.__call__``
while a model runs, so an unmodified model (an HF Flax model, say) with an unmodified parameter
tree gains ``y += s * (x @ a) @ b`` (+ ``s * (x @ A) @ B`` for the frozen merged part) on the
modules whose path has an adapter. Nothing dense is formed: the input is contracted with the
``(in, r)`` factor first.

Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from aroma_jax import inject
    >>> from aroma_jax.adapters import Pair
    >>> model = nn.Sequential([nn.Dense(3)])  # one Dense at path "layers_0"
    >>> v = model.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> pair = Pair(jnp.ones((4, 1)), jnp.ones((1, 3)))
    >>> with inject.adapters_applied({"layers_0": (pair, None)}, scale=1.0):
    ...     y = model.apply(v, jnp.ones((1, 4)))
    >>> bool(jnp.allclose(y - model.apply(v, jnp.ones((1, 4))), 4.0))
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from aroma_jax.adapters import Frozen, Pair

Array = jax.Array


@jax.custom_vjp
def _rank_one(x: Array, a: Array, b: Array) -> Array:
    """``(x @ a) @ b`` for ``r = 1``, as a fused reduction and an outer broadcast."""
    return _rank_one_fwd(x, a, b)[0]


def _rank_one_fwd(x, a, b):
    h = jnp.sum(x * a[:, 0], axis=-1, keepdims=True)  # (..., 1): a reduction XLA fuses
    return h * b[0], (x, a, b, h)


def _rank_one_bwd(res, g):
    x, a, b, h = res
    # One pass over g gives both dh and the b-gradient's reduction; one over x gives a's.
    gh = jnp.sum(g * b[0], axis=-1, keepdims=True)  # (..., 1)
    lead = tuple(range(x.ndim - 1))
    db = jnp.sum(g * h, axis=lead, dtype=jnp.float32)[None, :].astype(b.dtype)
    da = jnp.sum(x * gh, axis=lead, dtype=jnp.float32)[:, None].astype(a.dtype)
    dx = (gh * a[:, 0]).astype(x.dtype)
    return dx, da, db


_rank_one.defvjp(_rank_one_fwd, _rank_one_bwd)


def lowrank_delta(x: Array, a: Array, b: Array, scale: float) -> Array:
    """``scale * (x @ a) @ b`` for ``x: (..., in)``, ``a: (in, r)``, ``b: (r, out)``."""
    a = a.astype(x.dtype)
    b = b.astype(x.dtype)
    if a.shape[-1] == 1:
        return _rank_one(x, a * jnp.asarray(scale, x.dtype), b)
    return ((x @ a) * jnp.asarray(scale, x.dtype)) @ b


ModuleAdapters = Mapping[str, tuple[Pair | None, Frozen | None]]


def _module_path(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.path)


def _flatten_input(module: nn.Module, x: Array, in_ndim: int) -> tuple[Array, tuple[int, ...]]:
    """Views ``x`` as ``(..., fan_in)``; rejects DenseGeneral layouts the adapter cannot follow."""
    if isinstance(module, nn.DenseGeneral):
        axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
        axis = tuple(ax % x.ndim for ax in axis)
        if module.batch_dims or axis != tuple(range(x.ndim - len(axis), x.ndim)):
            raise ValueError(
                f"module {_module_path(module)!r}: adapters support DenseGeneral contracting the "
                f"trailing input axes without batch_dims; got axis={module.axis}, "
                f"batch_dims={module.batch_dims}"
            )
        in_ndim = len(axis)
    lead = x.shape[: x.ndim - in_ndim]
    return x.reshape(lead + (-1,)), lead


@contextlib.contextmanager
def adapters_applied(
    modules: ModuleAdapters, scale: float, in_ndim: Mapping[str, int] | None = None
) -> Iterator[set[str]]:
    """Within the block, matched Dense calls add their adapter's output.

    Args:
      modules: path -> ``(pair, frozen)``; either may be ``None`` to skip it (e.g. the frozen part
        once it is folded into the kernel).
      scale: ``alpha / r``.
      in_ndim: per path, the number of contracted input axes (for DenseGeneral); default 1.

    Yields the set of paths whose adapter was applied, filled in as the model runs (at trace
    time under ``jit``), so callers can detect adapters that never met their module.
    """
    hits: set[str] = set()
    in_ndim = dict(in_ndim or {})

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.DenseGeneral)):
            return next_fun(*args, **kwargs)
        path = _module_path(module)
        entry = modules.get(path)
        y = next_fun(*args, **kwargs)
        if entry is None:
            return y
        x = args[0] if args else kwargs["inputs"]
        x2, lead = _flatten_input(module, x, in_ndim.get(path, 1))
        x2 = x2.astype(y.dtype)
        pair, frozen = entry
        delta = None
        if pair is not None:
            delta = lowrank_delta(x2, pair.a, pair.b, scale)
        if frozen is not None and frozen.a.shape[-1] > 0:
            d = ((x2 @ frozen.a.astype(y.dtype)) * jnp.asarray(scale, y.dtype)) @ frozen.b.astype(
                y.dtype
            )
            delta = d if delta is None else delta + d
        hits.add(path)
        if delta is None:
            return y
        return y + delta.reshape(lead + y.shape[len(lead) :]).astype(y.dtype)

    with nn.intercept_methods(interceptor):
        yield hits
