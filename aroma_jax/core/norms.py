"""Factored Frobenius norms and AROMA's two convergence ratios (eqs. 5 and 6).

Nothing here forms an ``(in, out)`` matrix: every norm of a low-rank product is computed from the
small Gram matrices of its factors (docs/DESIGN.md section 1).

Flax convention: a kernel ``W`` has shape ``(in, out)``; a pair is ``a: (in, r)``, ``b: (r, out)``
and contributes ``x @ a @ b``.

Example:
    >>> import jax.numpy as jnp
    >>> a = jnp.ones((4, 1)); b = jnp.full((1, 3), 2.0)
    >>> float(product_norm(a, b))  # |a b|_F = |a| |b| = 2 * sqrt(12)
    6.928203...
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array


def product_sq_norm(a: Array, b: Array) -> Array:
    """``|a @ b|_F^2 = trace((a^T a)(b b^T))`` for ``a: (in, k)``, ``b: (k, out)``."""
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    if a.shape[-1] == 1:  # rank one: |a b| = |a| |b|, no Gram matrices needed
        return jnp.sum(a * a) * jnp.sum(b * b)
    return jnp.sum((a.T @ a) * (b @ b.T))


def product_norm(a: Array, b: Array) -> Array:
    """``|a @ b|_F`` without forming ``a @ b``."""
    return jnp.sqrt(product_sq_norm(a, b))


def products_sq_norms(pairs: Sequence[tuple[Array, Array]]) -> Array:
    """``|a_i @ b_i|_F^2`` of many pairs at once, as one vector in the given order.

    Each ``a: (*lead, in, r)``, ``b: (*lead, r, out)`` gives ``prod(lead)`` entries (a
    layer-stacked module's layers). The factors are zero-padded to a common ``in`` and ``out``
    and reduced together: one Gram computation for every module, where one per module (and per
    shape) made XLA:CPU compile a tree of reduction kernels for each (about 0.1 s apiece).
    Padding adds zero rows to ``a`` and zero columns to ``b``, which leaves both Gram matrices,
    and so the norm, unchanged.
    """
    f = jnp.float32
    flat = [
        (a.reshape((-1,) + a.shape[-2:]).astype(f), b.reshape((-1,) + b.shape[-2:]).astype(f))
        for a, b in pairs
    ]
    n_in = max(a.shape[1] for a, _ in flat)
    n_out = max(b.shape[2] for _, b in flat)
    a = jnp.concatenate([jnp.pad(a, ((0, 0), (0, n_in - a.shape[1]), (0, 0))) for a, _ in flat])
    b = jnp.concatenate([jnp.pad(b, ((0, 0), (0, 0), (0, n_out - b.shape[2]))) for _, b in flat])
    if a.shape[-1] == 1:  # rank one: |a b| = |a| |b|
        return jnp.sum(a * a, axis=(1, 2)) * jnp.sum(b * b, axis=(1, 2))
    gram_a = jnp.einsum("nir,nis->nrs", a, a)
    gram_b = jnp.einsum("nro,nso->nrs", b, b)
    return jnp.sum(gram_a * gram_b, axis=(1, 2))


def kernel_product_inner(w: Array, a: Array, b: Array) -> Array:
    """Frobenius inner product ``<W, a @ b> = sum((a^T W) * b)``; costs one ``(k, out)`` product."""
    w = w.astype(jnp.float32)
    return jnp.sum((a.astype(jnp.float32).T @ w) * b.astype(jnp.float32))


def products_inner(a1: Array, b1: Array, a2: Array, b2: Array) -> Array:
    """``<a1 @ b1, a2 @ b2> = sum((a1^T a2) * (b1 b2^T))`` from the factors alone."""
    f = jnp.float32
    return jnp.sum((a1.astype(f).T @ a2.astype(f)) * (b1.astype(f) @ b2.astype(f).T))


def base_plus_product_sq_norm(w0_sq: Array, w0: Array, a: Array, b: Array, scale: float) -> Array:
    """``|W0 + s A B|_F^2 = |W0|^2 + 2 s <W0, A B> + s^2 |A B|^2`` without forming ``A B``.

    ``w0_sq`` is ``|W0|_F^2``, computed once. The expansion can cancel in fp32 only when the
    update nearly negates ``W0``; eq. 6 is a threshold test on the result, so fp32 suffices. The
    result is clamped at zero against tiny negative round-off.
    """
    sq = w0_sq + 2.0 * scale * kernel_product_inner(w0, a, b) + scale**2 * product_sq_norm(a, b)
    return jnp.maximum(sq, 0.0)


def inner_ratio(norm_now: Array, norm_prev: Array) -> Array:
    """Eq. 5: the *signed* relative change ``(n_t - n_{t-dT}) / n_{t-dT}``.

    A zero previous norm (the first check after a re-init, where ``b = 0``) gives ``+inf``, so
    that check can never converge.
    """
    safe = jnp.where(norm_prev > 0, norm_prev, 1.0)
    return jnp.where(norm_prev > 0, (norm_now - norm_prev) / safe, jnp.inf)


def outer_ratio(pair_norm: Array, base_norm: Array, scale: float) -> Array:
    """Eq. 6: ``|s a b|_F / |W0 + dW|_F``, with ``dW`` excluding the current pair."""
    return scale * pair_norm / jnp.maximum(base_norm, jnp.finfo(jnp.float32).tiny)


def kaiming_uniform(key: Array, fan_in: int, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    """torch ``nn.Linear``'s default init: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / jnp.sqrt(jnp.asarray(fan_in, jnp.float32))
    return jax.random.uniform(key, shape, dtype, -bound, bound)
