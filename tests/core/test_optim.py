import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aroma_jax import AromaConfig
from aroma_jax.core import optim


def params():
    return {"p": {"a": jnp.ones((300, 4)), "b": jnp.ones((4, 50))}, "q": jnp.ones((64,))}


def warm_state(tx, ps, steps=3):
    state = tx.init(ps)
    for i in range(steps):
        g = jax.tree.map(lambda x, i=i: jnp.full_like(x, 0.1 * (i + 1)), ps)
        _, state = tx.update(g, state, ps)
    return state


def test_inactive_leaves_get_exactly_zero_updates():
    ps = params()
    tx = optim.wrap(optax.adam(1e-2))
    state = warm_state(tx, ps)
    active = {"p": {"a": jnp.array(False), "b": jnp.array(False)}, "q": jnp.array(True)}
    g = jax.tree.map(jnp.ones_like, ps)
    upd, _ = tx.update(g, state, ps, active=active)
    assert float(jnp.abs(upd["p"]["a"]).max()) == 0.0 and float(jnp.abs(upd["p"]["b"]).max()) == 0
    assert float(jnp.abs(upd["q"]).min()) > 0


@pytest.mark.parametrize("ratio", [0.999, 0.5])
def test_prune_zeroes_the_requested_fraction_of_masked_leaves_only(ratio):
    ps = params()
    tx = optim.wrap(optax.adam(1e-2))
    state = warm_state(tx, ps)
    mask = {"p": {"a": jnp.array(True), "b": jnp.array(True)}, "q": jnp.array(False)}
    new = optim.reset(tx, state, mask, jax.random.key(0), ps, "prune", ratio)
    adam_old, adam_new = state.inner[0], new.inner[0]
    for name in ("mu", "nu"):
        old_p, new_p = getattr(adam_old, name), getattr(adam_new, name)
        n = old_p["p"]["a"].size + old_p["p"]["b"].size
        zeroed = int(jnp.sum(new_p["p"]["a"] == 0) + jnp.sum(new_p["p"]["b"] == 0))
        assert abs(zeroed / n - ratio) < 0.05
        np.testing.assert_array_equal(new_p["q"], old_p["q"])  # unmasked leaf untouched
    assert int(adam_new.count) == int(adam_old.count)  # shared bias-correction count kept
    assert int(new.last_outer) == int(state.count)


def test_full_reset_equals_fresh_init_on_masked_leaves():
    ps = params()
    tx = optim.wrap(optax.adam(1e-2))
    state = warm_state(tx, ps)
    mask = {"p": {"a": jnp.array(True), "b": jnp.array(True)}, "q": jnp.array(False)}
    new = optim.reset(tx, state, mask, jax.random.key(0), ps, "full")
    fresh = tx.init(ps)
    for name in ("mu", "nu"):
        got, init = getattr(new.inner[0], name), getattr(fresh.inner[0], name)
        np.testing.assert_array_equal(got["p"]["a"], init["p"]["a"])
        np.testing.assert_array_equal(got["p"]["b"], init["p"]["b"])
        np.testing.assert_array_equal(got["q"], getattr(state.inner[0], name)["q"])


def test_none_reset_keeps_state_but_starts_rewarmup():
    ps = params()
    tx = optim.wrap(optax.adam(1e-2), rewarmup_steps=4)
    state = warm_state(tx, ps)
    mask = jax.tree.map(lambda _: jnp.array(True), ps)
    new = optim.reset(tx, state, mask, jax.random.key(0), ps, "none")
    jax.tree.map(np.testing.assert_array_equal, new.inner, state.inner)
    assert int(new.last_outer) == 3


def test_rewarmup_ramps_from_the_actual_outer_step():
    ps = {"w": jnp.zeros(3)}
    tx = optim.wrap(optax.sgd(1.0), rewarmup_steps=4)
    state = tx.init(ps)
    g = {"w": -jnp.ones(3)}
    sizes = []
    for step in range(12):
        if step == 5:  # an outer step at an arbitrary (adaptive) point
            mask = {"w": jnp.array(True)}
            state = optim.reset(tx, state, mask, jax.random.key(0), ps, "none")
        upd, state = tx.update(g, state, ps)
        sizes.append(float(upd["w"][0]))
    assert sizes[:5] == [1.0] * 5
    assert sizes[5:10] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_first_update_after_prune_is_about_3x_a_first_adam_step():
    # Shared count: bias correction does not restart, so with mu and nu zeroed the first
    # update is (1-b1)/sqrt(1-b2) ~ 3.16x larger than Adam's usual first step (|g|/|g| = 1).
    cfg = AromaConfig(
        target_modules=("x",),
        warmup_steps=0,
        rewarmup_steps=0,
        learning_rate=1.0,
        schedule="constant",
    )
    tx = optim.make_optimizer(cfg)
    ps = {"w": jnp.zeros(())}
    state = tx.init(ps)
    for _ in range(3):
        _, state = tx.update({"w": jnp.ones(())}, state, ps)
    # Deep into training: the shared count is large, so bias correction is ~1.
    adam = state.inner[0]._replace(count=jnp.asarray(100_000, jnp.int32))
    state = state._replace(inner=(adam,) + tuple(state.inner[1:]))
    state = optim.reset(tx, state, {"w": jnp.array(True)}, jax.random.key(0), ps, "full")
    upd, _ = tx.update({"w": jnp.ones(())}, state, ps)
    assert abs(float(upd["w"])) == pytest.approx(0.1 / np.sqrt(0.001), rel=1e-3)  # 3.16


def test_base_schedule_warmup_and_linear_decay():
    cfg = AromaConfig(target_modules=("x",), learning_rate=1.0, warmup_steps=4, max_steps=14)
    sched = optim.base_schedule(cfg)
    lrs = [float(sched(c)) for c in range(14)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(0.9) and lrs[-1] == pytest.approx(0.0)


def test_rewarmup_only_on_masked_leaves():
    ps = {"pair": jnp.zeros(2), "head": jnp.zeros(2)}
    tx = optim.wrap(optax.sgd(1.0), rewarmup_steps=4)
    state = optim.reset(
        tx, tx.init(ps), jax.tree.map(lambda _: jnp.array(True), ps), jax.random.key(0), ps, "none"
    )
    g = jax.tree.map(lambda x: -jnp.ones_like(x), ps)
    upd, _ = tx.update(g, state, ps, rewarm={"pair": jnp.array(True), "head": jnp.array(False)})
    assert float(upd["pair"][0]) == 0.25 and float(upd["head"][0]) == 1.0


def test_prune_keeps_or_zeroes_each_entrys_mu_and_nu_together():
    ps = {"a": jnp.zeros((64, 64))}
    tx = optim.wrap(optax.adam(1e-2))
    state = tx.init(ps)
    for _ in range(3):
        _, state = tx.update({"a": jnp.ones((64, 64))}, state, ps)
    new = optim.reset(tx, state, {"a": jnp.array(True)}, jax.random.key(3), ps, "prune", 0.5)
    mu, nu = new.inner[0].mu["a"], new.inner[0].nu["a"]
    np.testing.assert_array_equal(mu == 0, nu == 0)  # one mask for both moments
    assert 0.4 < float(jnp.mean(mu == 0)) < 0.6


@pytest.mark.parametrize("bias_correction", ["shared", "per_module"])
def test_first_step_of_a_fresh_zero_gradient_factor_stays_bounded(bias_correction):
    # A fresh pair's `a` sees an exactly zero gradient while b = 0. With ReLoRA's independent
    # masks an entry could keep mu but lose nu, and its first update would be mu / eps.
    cfg = AromaConfig(
        target_modules=("x",),
        warmup_steps=0,
        rewarmup_steps=0,
        learning_rate=1.0,
        schedule="constant",
        bias_correction=bias_correction,
        prune_ratio=0.5,
    )
    tx = optim.make_optimizer(cfg)
    ps = {"a": jnp.zeros((256,))}
    state = tx.init(ps)
    for _ in range(50):
        _, state = tx.update({"a": jnp.ones((256,))}, state, ps)
    state = optim.reset(tx, state, {"a": jnp.array(True)}, jax.random.key(0), ps, "prune", 0.5)
    upd, _ = tx.update({"a": jnp.zeros((256,))}, state, ps)
    assert float(jnp.abs(upd["a"]).max()) < 10.0  # kept entries: bounded by ~9 m / sqrt(999 v)
