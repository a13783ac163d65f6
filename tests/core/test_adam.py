"""Per-leaf Adam bias correction: equal to optax's Adam without restarts; after a restart a leaf
takes Adam's first steps again, where a shared count overshoots."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aroma_jax.core import adam, optim


def test_equals_optax_adam_without_restarts():
    params = {"a": jnp.ones((3, 2)), "b": {"c": jnp.zeros(4)}}
    ours, ref = adam.scale_by_adam_per_leaf(), optax.scale_by_adam()
    s1, s2 = ours.init(params), ref.init(params)
    key = jax.random.key(0)
    for _ in range(50):
        key, k1, k2 = jax.random.split(key, 3)
        g = {"a": jax.random.normal(k1, (3, 2)), "b": {"c": jax.random.normal(k2, (4,))}}
        u1, s1 = ours.update(g, s1)
        u2, s2 = ref.update(g, s2)
        for x, y in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
            np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-7)
    assert s1.counts.tolist() == [50, 50]


def step_sizes_after_reset(bias_correction: str, reset_at: int, after: int) -> float:
    """|update| ``after`` steps past a full reset at ``reset_at``, constant gradient 1, lr 1.

    Adam's nominal update for a constant gradient is 1: the returned value is the overshoot.
    """
    cfg_tx = (
        adam.scale_by_adam_per_leaf() if bias_correction == "per_module" else optax.scale_by_adam()
    )
    tx = optim.wrap(cfg_tx)
    params = {"pair": jnp.zeros(())}
    state = tx.init(params)
    g = {"pair": jnp.ones(())}
    u = None
    for t in range(reset_at + after):
        if t == reset_at:
            mask = {"pair": jnp.array(True)}
            state = optim.reset(tx, state, mask, jax.random.key(0), params, "full")
        u, state = tx.update(g, state, params)
    return float(jnp.abs(u["pair"]))


def test_shared_count_overshoots_after_a_reset_and_per_leaf_does_not():
    # The numbers: ~1.7x ten steps after a reset at t=60, ~3.1x after one at t=240.
    assert 1.6 < step_sizes_after_reset("shared", 60, 10) < 1.8
    assert 2.9 < step_sizes_after_reset("shared", 240, 10) < 3.3
    for reset_at in (60, 240, 1000):
        for after in (1, 10, 50):
            assert abs(step_sizes_after_reset("per_module", reset_at, after) - 1.0) < 1e-5


def test_prune_reset_restarts_only_the_masked_leaves_counts():
    tx = optim.wrap(adam.scale_by_adam_per_leaf())
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    state = tx.init(params)
    for _ in range(5):
        _, state = tx.update(params, state, params)
    mask = {"a": jnp.array(True), "b": jnp.array(False)}
    new = optim.reset(tx, state, mask, jax.random.key(1), params, "prune", 0.999)
    assert new.inner.counts.tolist() == [0, 5]
    kept = optim.reset(tx, state, mask, jax.random.key(1), params, "none")
    assert kept.inner.counts.tolist() == [5, 5]  # no reset: the count is not restarted either
