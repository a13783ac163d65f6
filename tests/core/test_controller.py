"""The controller's pieces against plain references: slot writes, pair norms (stacked modules
together, unstacked ones apart), eq. 5, outer steps with caller-split keys, and what the
compiled step is made of."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aroma_jax.core import adapters as adapters_lib
from aroma_jax.core import controller
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


def test_inner_check_is_the_signed_eq5_of_dense_products():
    """Eq. 5 against ``(|A B|_F - prev) / prev`` written out on dense numpy products, one
    module per case: a shrinking pair (negative rho) converges, a sticky label survives
    rho >= tol, a done module gets NaN and keeps its label (either way), a zero previous norm
    never converges, and a growing pair under tol converges."""
    tol = 0.05
    rng = np.random.default_rng(0)
    cases = {  # name: (scale of the pair's product against prev, label before, done)
        "a_shrinks": (0.5, False, False),  # rho = -0.5: negative, converges
        "b_sticky": (1.8, True, False),  # rho = +0.8 >= tol: the label stays
        "c_done_labelled": (0.5, True, True),  # NaN, label kept True
        "d_done_unlabelled": (0.5, False, True),  # NaN, label kept False despite rho < tol
        "e_first_check": (1.0, False, False),  # prev = 0: never converges
        "f_grows_slowly": (1.01, False, False),  # rho = +0.01 < tol
        "g_grows_fast": (1.3, False, False),  # rho = +0.3: not converged
    }
    pairs, prev, conv, done, want_rho, want_conv = {}, {}, {}, {}, {}, {}
    for name, (ratio, label, is_done) in cases.items():
        a = rng.normal(size=(IN, R)).astype(np.float32)
        b = rng.normal(size=(R, OUT)).astype(np.float32)
        now = float(np.linalg.norm(a.astype(np.float64) @ b.astype(np.float64)))
        before = 0.0 if name == "e_first_check" else now / ratio
        rho = (now - before) / before if before > 0 else np.inf
        pairs[name] = Pair(jnp.asarray(a), jnp.asarray(b))
        prev[name] = jnp.asarray(before, jnp.float32)
        conv[name], done[name] = jnp.asarray(label), jnp.asarray(is_done)
        want_rho[name] = np.nan if is_done else rho
        want_conv[name] = label or (not is_done and rho < tol)
    assert want_rho["a_shrinks"] < 0 and want_conv["a_shrinks"]
    assert want_rho["b_sticky"] >= tol and want_conv["b_sticky"]
    adapters = adapters_lib.AdapterState(
        pairs, {k: None for k in cases}, {k: jnp.zeros((), jnp.int32) for k in cases}, done
    )
    ctrl = controller.ControllerState(
        step=jnp.zeros((), jnp.int32),
        inner_t=jnp.zeros((), jnp.int32),
        outer_count=jnp.zeros((), jnp.int32),
        prev_norm=prev,
        inner_conv=conv,
        base_sq={k: jnp.ones(()) for k in cases},
        key=jax.random.key(0),
        finished=jnp.zeros((), bool),
    )
    new, rho = controller.inner_check(ctrl, adapters, toy_config(inner_tol=tol))
    for i, name in enumerate(sorted(cases)):
        np.testing.assert_allclose(float(rho[i]), want_rho[name], rtol=1e-5, err_msg=name)
        assert bool(new.inner_conv[name]) == want_conv[name], name
        now = np.linalg.norm(np.asarray(pairs[name].a, np.float64) @ np.asarray(pairs[name].b))
        np.testing.assert_allclose(float(new.prev_norm[name]), now, rtol=1e-5, err_msg=name)


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
        # re-init: one draw (every a is 32 long); prune: one per leaf size (a 32, b 24); each
        # draw's per-(module, layer) keys come from one vmapped pair of folds
        ("aroma", {"random_split": 1, "random_bits": 3, "random_fold_in": 4}),
        ("lora", {"random_split": 1}),
    ],
)
def test_the_step_makes_one_threefry_call_per_purpose(method, want):
    # XLA:CPU compiles each Threefry call site as its own loop: the step's key and the
    # controller's are split in one call; an outer step draws the re-init and the prune, one
    # vmapped call per leaf size over every (module, layer), not one per module.
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
    # layout group, the re-init's two. A barrier after each draw keeps one copy (same numbers):
    # the re-init's one draw and the prune's two (one per leaf size: a 32, b 24).
    trainer, state, model, teacher = make(toy_config(reset="prune"))
    batch = next(batches(teacher, model, 8, 1))
    text = trainer._step.lower(state, batch).as_text()
    assert text.count("stablehlo.optimization_barrier") == 3
