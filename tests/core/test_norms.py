import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aroma_jax.core import norms


def rand(*shape, seed=0):
    return np.random.default_rng(seed + sum(shape)).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("r", [1, 3, 8])
def test_product_norm_matches_dense(r):
    a, b = rand(20, r), rand(r, 12, seed=1)
    dense = np.linalg.norm(a @ b)
    np.testing.assert_allclose(float(norms.product_norm(a, b)), dense, rtol=1e-5)


def test_rank_one_norm_is_product_of_norms():
    a, b = rand(7, 1), rand(1, 5)
    np.testing.assert_allclose(
        float(norms.product_norm(a, b)), np.linalg.norm(a) * np.linalg.norm(b), rtol=1e-6
    )


@pytest.mark.parametrize("k", [0, 1, 4])
def test_base_plus_product_norm_matches_dense(k):
    w0, a, b = rand(16, 10), rand(16, k, seed=2), rand(k, 10, seed=3)
    s = 0.7
    dense = np.linalg.norm(w0 + s * a @ b) ** 2
    got = norms.base_plus_product_sq_norm(np.sum(w0**2), w0, a, b, s)
    np.testing.assert_allclose(float(got), dense, rtol=1e-5)


def test_products_inner_matches_dense():
    a1, b1, a2, b2 = rand(9, 2), rand(2, 6), rand(9, 3, seed=5), rand(3, 6, seed=6)
    np.testing.assert_allclose(
        float(norms.products_inner(a1, b1, a2, b2)), np.sum((a1 @ b1) * (a2 @ b2)), rtol=1e-5
    )


def test_inner_ratio_is_signed_relative_change():
    # Eq. 5: (n_t - n_prev) / n_prev, signed: shrinking norms give negative ratios.
    assert float(norms.inner_ratio(jnp.float32(1.1), jnp.float32(1.0))) == pytest.approx(0.1)
    assert float(norms.inner_ratio(jnp.float32(0.8), jnp.float32(1.0))) == pytest.approx(-0.2)
    # A zero previous norm (first check after re-init) never converges.
    assert float(norms.inner_ratio(jnp.float32(0.3), jnp.float32(0.0))) == np.inf


def test_outer_ratio_eq6_against_dense_reference():
    w0, fa, fb, a, b = rand(12, 8), rand(12, 2), rand(2, 8), rand(12, 1, seed=9), rand(1, 8)
    s = 2.0
    base = w0 + s * fa @ fb
    ref = np.linalg.norm(s * a @ b) / np.linalg.norm(base)
    base_norm = jnp.sqrt(norms.base_plus_product_sq_norm(np.sum(w0**2), w0, fa, fb, s))
    got = norms.outer_ratio(norms.product_norm(a, b), base_norm, s)
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)


def test_kaiming_uniform_bounds_like_torch_linear():
    x = norms.kaiming_uniform(jax.random.key(0), 64, (64, 4))
    bound = 1 / np.sqrt(64)
    assert float(jnp.max(jnp.abs(x))) <= bound
    assert float(jnp.max(jnp.abs(x))) > 0.9 * bound  # actually spread over the range


@pytest.mark.parametrize("r", [1, 3])
def test_products_sq_norms_match_the_dense_products_entry_by_entry(r):
    # An unstacked pair, a 3-layer stack and a 2x2-lead bf16 stack: padded to one shape.
    pairs = [
        (rand(5, r), rand(r, 7, seed=1)),
        (rand(3, 9, r, seed=2), rand(3, r, 4, seed=3)),
        (rand(2, 2, 4, r, seed=4), rand(2, 2, r, 11, seed=5)),
    ]
    pairs[2] = tuple(jnp.asarray(x, jnp.bfloat16) for x in pairs[2])
    want = []
    for a, b in pairs:
        a = np.asarray(a, np.float32).reshape((-1,) + a.shape[-2:])
        b = np.asarray(b, np.float32).reshape((-1,) + b.shape[-2:])
        want += [np.sum(np.square(ai @ bi)) for ai, bi in zip(a, b, strict=True)]
    got = norms.products_sq_norms(pairs)
    assert got.shape == (1 + 3 + 4,)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
