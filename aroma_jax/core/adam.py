"""Adam with one bias-correction count per parameter leaf, restartable per leaf.

optax's ``scale_by_adam`` keeps one ``count`` for the whole tree. AROMA resets a merged pair's
moments at its outer step, but a shared count keeps dividing the fresh pair's near-zero second
moment by ``1 - b2^t`` at the *global* step ``t``: its update ``m_hat / sqrt(v_hat)`` then runs
well above Adam's nominal size for hundreds of steps (with a constant gradient, about 1.7x ten
steps after a reset at t=60 and 3.1x after one at t=240, far beyond a 10-50-step re-warmup).
Here every leaf has its own count, so `restart` can send a reset leaf back to Adam's first step.

With no restarts this is exactly ``scale_by_adam`` (same moments, same corrections).

Example:
    >>> import jax.numpy as jnp
    >>> from aroma_jax.core import adam
    >>> tx = adam.scale_by_adam_per_leaf()
    >>> params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    >>> state = tx.init(params)
    >>> state.counts.tolist()
    [0, 0]
    >>> u, state = tx.update({"a": jnp.ones(2), "b": -jnp.ones(3)}, state)
    >>> [round(float(x), 4) for x in (u["a"][0], u["b"][0])]  # Adam's first step: sign(g)
    [1.0, -1.0]
    >>> adam.restart(state, {"a": jnp.array(True), "b": jnp.array(False)}).counts.tolist()
    [0, 1]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


class PerLeafAdamState(NamedTuple):
    # One int32 per parameter leaf (per layer of a stacked leaf), in `jax.tree.leaves` order.
    # A vector rather than a params-shaped tree: optax's `tree_map_params` (used for prunes and
    # sharding) must not mistake it for a copy of the parameters.
    counts: Array
    mu: Any
    nu: Any


LeadNdim = Callable[[Any], Any]


def _lead_shapes(params: Any, lead_ndim: LeadNdim | None) -> list[tuple[int, ...]]:
    leaves = jax.tree.leaves(params)
    # optax's `tree_map_params` calls `init` on a stand-in for the params that has no leaves.
    if lead_ndim is None or not leaves or not all(hasattr(x, "shape") for x in leaves):
        return [() for _ in leaves]
    ks = jax.tree.leaves(lead_ndim(params))
    return [tuple(x.shape[:k]) for x, k in zip(leaves, ks, strict=True)]


def scale_by_adam_per_leaf(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, lead_ndim: LeadNdim | None = None
) -> optax.GradientTransformation:
    """``scale_by_adam`` with a per-leaf bias-correction count (see the module docstring).

    ``lead_ndim(params)``: a params-shaped tree of ints, the leading *stack* axes of each leaf
    (1 for a layer-stacked adapter leaf ``(L, in, r)``); such a leaf gets one count per layer,
    so each layer's pair restarts on its own. Default: no stacked leaves.
    """

    def init_fn(params):
        n = sum(math.prod(s) for s in _lead_shapes(params, lead_ndim))
        zeros = optax.tree_utils.tree_zeros_like(params)
        return PerLeafAdamState(
            jnp.zeros((n,), jnp.int32), zeros, optax.tree_utils.tree_zeros_like(params)
        )

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda g, m: (1 - b1) * g + b1 * m, updates, state.mu)
        nu = jax.tree.map(lambda g, v: (1 - b2) * (g * g) + b2 * v, updates, state.nu)
        counts = optax.safe_increment(state.counts)
        c = counts.astype(jnp.float32)
        bc1, bc2 = 1 - b1**c, 1 - b2**c
        mu_leaves, treedef = jax.tree.flatten(mu)
        nu_leaves = treedef.flatten_up_to(nu)
        out, start = [], 0
        for m, v, lead in zip(mu_leaves, nu_leaves, _lead_shapes(mu, lead_ndim), strict=True):
            size = math.prod(lead)
            shape = lead + (1,) * (m.ndim - len(lead))
            c1 = bc1[start : start + size].reshape(shape).astype(m.dtype)
            c2 = bc2[start : start + size].reshape(shape).astype(v.dtype)
            out.append((m / c1) / (jnp.sqrt(v / c2) + eps))
            start += size
        return treedef.unflatten(out), PerLeafAdamState(counts, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def restart(state: PerLeafAdamState, mask: Any) -> PerLeafAdamState:
    """Sets the count of every leaf where ``mask`` (a params-shaped tree of bools) is True to 0.

    A stacked leaf (see ``lead_ndim``) takes a mask of shape ``(L, 1, ...)``: one flag per layer.
    """
    flat = jnp.concatenate([jnp.ravel(jnp.asarray(m, bool)) for m in jax.tree.leaves(mask)])
    if flat.shape[0] != state.counts.shape[0]:
        raise ValueError(
            f"restart mask has {flat.shape[0]} flags but the state has {state.counts.shape[0]} "
            "counts: an unstacked leaf takes a scalar, a stacked one an (L, 1, ...) mask"
        )
    return state._replace(counts=jnp.where(flat, 0, state.counts))


def restart_all(opt_state: Any, mask: Any) -> Any:
    """`restart` applied to every `PerLeafAdamState` inside an optimizer state (e.g. a chain)."""
    is_adam = lambda x: isinstance(x, PerLeafAdamState)  # noqa: E731
    return jax.tree.map(lambda s: restart(s, mask) if is_adam(s) else s, opt_state, is_leaf=is_adam)
