"""The controller's pieces against plain references: slot writes, pair norms (stacked modules
together, unstacked ones apart), eq. 5, outer steps with caller-split keys, and what the
compiled step is made of."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aroma_jax.core import adapters as adapters_lib
from aroma_jax.core import controller, norms
from aroma_jax.core.adapters import Frozen, Pair
from aroma_jax.examples.toy import batches, toy_config
from tests.core.test_train_step import make

L, IN, OUT, R, SLOTS = 3, 6, 5, 2, 4


def stacked_factors(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    return Frozen(f(L, IN, SLOTS * R), f(L, SLOTS * R, OUT)), Pair(f(L, IN, R), f(L, R, OUT))


def test_write_slot_writes_each_layers_own_slot_and_nothing_else():
    frozen, pair = stacked_factors()
    slots = jnp.array([0, 3, 1])
    write = jnp.array([True, True, False])
    write_fn = controller.per_layer(lambda f, p, s, w: controller.write_slot(f, p, s, R, w), 1)
    got = write_fn(frozen, pair, slots, write)
    want_a, want_b = np.array(frozen.a), np.array(frozen.b)
    for i, (s, w) in enumerate(zip(slots.tolist(), write.tolist(), strict=True)):
        if w:
            want_a[i, :, s * R : (s + 1) * R] = pair.a[i]
            want_b[i, s * R : (s + 1) * R, :] = pair.b[i]
    np.testing.assert_array_equal(got.a, want_a)
    np.testing.assert_array_equal(got.b, want_b)
    # a slot past the buffer writes nothing (callers never ask for one)
    past = write_fn(frozen, pair, jnp.full((L,), SLOTS), jnp.ones((L,), bool))
    np.testing.assert_array_equal(past.a, frozen.a)


def test_per_layer_slot_writes_compile_to_no_scatter_or_gather():
    # A dynamic update slice mapped over layers with per-layer slots becomes a scatter (and its
    # read a gather), the costliest kernels XLA:CPU compiles in the outer step.
    frozen, pair = stacked_factors()
    write_fn = controller.per_layer(lambda f, p, s, w: controller.write_slot(f, p, s, R, w), 1)
    hlo = jax.jit(write_fn).lower(frozen, pair, jnp.zeros((L,), int), jnp.ones((L,), bool))
    ops = set(re.findall(r"= \S+ ([a-z-]+)\(", hlo.compile().as_text()))
    assert not ops & {"scatter", "gather"}, ops


def test_pair_norms_of_stacked_and_unstacked_modules_match_each_layers_norm():
    frozen, stacked = stacked_factors()
    single = Pair(stacked.a[0] * 3.0, stacked.b[1])
    adapters = adapters_lib.AdapterState(
        pairs={"s": stacked, "u": single},
        frozen={"s": frozen, "u": None},
        merges={"s": jnp.zeros((L,), jnp.int32), "u": jnp.zeros((), jnp.int32)},
        done={"s": jnp.zeros((L,), bool), "u": jnp.zeros((), bool)},
    )
    got = controller.pair_norms(adapters)
    assert got["s"].shape == (L,) and got["u"].shape == ()
    for i in range(L):
        want = np.linalg.norm(np.asarray(stacked.a[i]) @ np.asarray(stacked.b[i]))
        np.testing.assert_allclose(got["s"][i], want, rtol=1e-5)
    want = np.linalg.norm(np.asarray(single.a) @ np.asarray(single.b))
    np.testing.assert_allclose(got["u"], want, rtol=1e-5)


def test_inner_check_equals_eq5_module_by_module():
    trainer, state, model, teacher = make(toy_config(inner_tol=0.05))
    for batch in batches(teacher, model, 32, 7):
        state, _ = trainer.step(state, batch)
    prev = dict(zip(sorted(state.ctrl.prev_norm), [0.0, 1e-3, 9.0], strict=True))
    # a mix of previous norms: zero (the first check after a re-init), small, large
    ctrl = state.ctrl._replace(prev_norm={p: jnp.asarray(v) for p, v in prev.items()})
    adapters = state.adapters._replace(done={**state.adapters.done, "m1": jnp.array(True)})
    new, rho = controller.inner_check(ctrl, adapters, trainer.cfg)
    for i, p in enumerate(sorted(adapters.pairs)):
        now = norms.product_norm(adapters.pairs[p].a, adapters.pairs[p].b)
        want = norms.inner_ratio(now, ctrl.prev_norm[p])
        done = bool(adapters.done[p])
        conv = bool(ctrl.inner_conv[p]) or (not done and float(want) < trainer.cfg.inner_tol)
        assert bool(new.inner_conv[p]) == conv
        np.testing.assert_allclose(new.prev_norm[p], now, rtol=1e-6)
        np.testing.assert_allclose(rho[i], np.nan if done else want, rtol=1e-6)


def test_outer_step_with_caller_split_keys_equals_splitting_its_own():
    trainer, state, model, teacher = make(toy_config())
    for batch in batches(teacher, model, 32, 5):
        state, _ = trainer.step(state, batch)
    args = (state.adapters, trainer.kernels(state.base), trainer.specs, trainer.cfg, trainer.folded)
    own = controller.outer_step(state.ctrl, *args)
    # the step splits both keys in one call: split(k, 3)[:2] is split(k)
    both = jax.vmap(lambda k: jax.random.split(k, 3))(jnp.stack([state.rng, state.ctrl.key]))
    drawn = controller.outer_step(state.ctrl, *args, keys=(both[1][0], both[1][1]))
    plain = lambda x: jax.random.key_data(x) if x.dtype == state.ctrl.key.dtype else x  # noqa: E731
    for x, y in zip(jax.tree.leaves(own), jax.tree.leaves(drawn), strict=True):
        np.testing.assert_array_equal(plain(x), plain(y))


def random_calls(jaxpr) -> dict[str, int]:
    """Call sites of the random primitives in ``jaxpr`` and every jaxpr nested in it."""
    out: dict[str, int] = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("random_split", "random_bits", "random_fold_in"):
            out[eqn.primitive.name] = out.get(eqn.primitive.name, 0) + 1
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    for k, n in random_calls(inner).items():
                        out[k] = out.get(k, 0) + n
    return out


@pytest.mark.parametrize(
    ("method", "want"),
    [
        ("aroma", {"random_split": 1, "random_bits": 2}),
        ("lora", {"random_split": 1}),
    ],
)
def test_the_step_makes_one_threefry_call_per_purpose(method, want):
    # XLA:CPU compiles each Threefry call site as its own loop: the step's key and the
    # controller's are split in one call; an outer step draws the re-init and the prune.
    trainer, state, model, teacher = make(toy_config(method=method, reset="prune"))
    batch = next(batches(teacher, model, 8, 1))
    jaxpr = jax.make_jaxpr(trainer._step_impl)(state, batch).jaxpr
    assert random_calls(jaxpr) == want


def cond_calls(jaxpr) -> int:
    """``cond`` call sites in ``jaxpr`` and every jaxpr nested in it."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "cond"
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += cond_calls(inner)
    return n


@pytest.mark.parametrize(("method", "want"), [("aroma", 1), ("relora", 1), ("lora", 0)])
def test_only_the_outer_step_is_a_branch(method, want):
    # The inner check is a few selects on per-module scalars; as a `lax.cond` it cost XLA:CPU
    # about a second of compile, and its pair norms compiled a second time in the outer branch.
    trainer, state, model, teacher = make(toy_config(method=method))
    batch = next(batches(teacher, model, 8, 1))
    assert cond_calls(jax.make_jaxpr(trainer._step_impl)(state, batch).jaxpr) == want


def test_the_steps_inner_check_is_eq5_at_check_steps_and_changes_nothing_between():
    every = 3
    cfg = toy_config(inner_check_every=every, inner_tol=0.3, inner_max_steps=10_000)
    trainer, state, model, teacher = make(cfg)
    n = len(trainer.paths)
    checks = 0
    for batch in batches(teacher, model, 32, 40):
        new, info = trainer.step(state, batch)
        if bool(info.outer):  # an outer step resets the labels: compared up to the first one
            break
        now = controller.pair_norms(new.adapters)
        if int(new.ctrl.inner_t) % every == 0:
            checks += 1
            for i, p in enumerate(trainer.paths):
                prev, cur = float(state.ctrl.prev_norm[p]), float(now[p])
                want = (cur - prev) / prev if prev > 0 else np.inf
                np.testing.assert_allclose(float(info.rho_in[i]), want, rtol=1e-6)
                assert bool(new.ctrl.inner_conv[p]) == (
                    bool(state.ctrl.inner_conv[p]) or want < cfg.inner_tol
                )
                np.testing.assert_allclose(float(new.ctrl.prev_norm[p]), cur, rtol=1e-6)
        else:
            assert bool(np.all(np.isnan(info.rho_in))) and info.rho_in.shape == (n,)
            for p in trainer.paths:
                assert float(new.ctrl.prev_norm[p]) == float(state.ctrl.prev_norm[p])
                assert bool(new.ctrl.inner_conv[p]) == bool(state.ctrl.inner_conv[p])
        state = new
    assert checks >= 3
    assert any(bool(c) for c in state.ctrl.inner_conv.values())  # both outcomes were seen
    assert not all(bool(c) for c in state.ctrl.inner_conv.values())


def test_the_outer_steps_random_draws_are_materialised_once():
    # XLA's TPU compiler inlines the (elementwise) Threefry hash into every consumer of a draw:
    # the prune's one draw over all pairs became four copies of ~170 instructions, one per
    # layout group, the re-init's two. A barrier after each draw keeps one copy (same numbers).
    trainer, state, model, teacher = make(toy_config(reset="prune"))
    batch = next(batches(teacher, model, 8, 1))
    text = trainer._step.lower(state, batch).as_text()
    assert text.count("stablehlo.optimization_barrier") == 2
