"""The controller inside the jitted step: merges, re-inits, done masks, compiles, no dense dW."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aroma_jax import AromaTrainer
from aroma_jax.core import adapters as adapters_lib
from aroma_jax.core import controller, loop
from aroma_jax.examples.toy import D_IN, D_OUT, batches, make_problem, toy_config


def loss_for(model):
    def loss_fn(params, batch, rng):
        pred = model.apply({"params": params}, batch["x"])
        return jnp.mean(jnp.sum((pred - batch["y"]) ** 2, axis=-1))

    return loss_fn


def make(cfg, donate=False):
    model, student, teacher = make_problem(0)
    trainer = AromaTrainer(loss_for(model), student, cfg, donate=donate)
    return trainer, trainer.init(student), model, teacher


def outputs(trainer, state, model, x):
    with trainer.applied(state) as params:
        return model.apply({"params": params}, x)


def trained(cfg, steps):
    trainer, state, model, teacher = make(cfg)
    for batch in batches(teacher, model, 32, steps):
        state, _ = trainer.step(state, batch)
    return trainer, state, model, teacher


@pytest.mark.parametrize("fold", ["never", "auto"])
def test_merge_leaves_output_unchanged_and_reinit_zeroes_b(fold):
    # m0's planted rank is 0: its pair never moves, and a zero pair is never merged
    cfg = toy_config(fold=fold, outer_tol=0.0, inner_max_steps=10_000, r=2)
    trainer, state, model, _ = trained(cfg.replace(target_modules=("m1", "m3")), 30)
    x = jax.random.normal(jax.random.key(7), (16, D_IN))
    before = outputs(trainer, state, model, x)
    kernels = trainer.kernels(state.base)
    ctrl, adapters, new_k, info = controller.outer_step(
        state.ctrl, state.adapters, kernels, trainer.specs, cfg, trainer.folded
    )
    base = state.base
    for p, k in new_k.items():
        base = {**base, p: {**base[p], "kernel": k}}
    merged_state = state._replace(base=base, adapters=adapters, ctrl=ctrl)
    after = outputs(trainer, merged_state, model, x)
    np.testing.assert_allclose(after, before, atol=1e-5, rtol=1e-6)
    assert bool(info.merged.all())
    for p in trainer.paths:
        assert int(adapters.merges[p]) == 1
        assert float(jnp.abs(adapters.pairs[p].b).max()) == 0.0  # re-init: b = 0
        a_new, a_old = adapters.pairs[p].a, state.adapters.pairs[p].a
        assert float(jnp.abs(a_new).max()) <= 1 / np.sqrt(D_IN)
        assert not np.allclose(a_new, a_old)  # a is re-drawn
    assert (trainer.folded == frozenset(trainer.paths)) == (fold == "auto")


@pytest.mark.parametrize("fold", ["never", "auto"])
def test_the_steps_eq6_is_the_dense_ratio_at_every_merge(fold):
    """Eq. 6 in the jitted step, kept as |W0 + dW|^2 updated by each merge, equals
    ``s |a b| / |W0 + dW|`` formed densely from the frozen slots, at every outer step (with
    several merges behind it), for factors and folded kernels."""
    cfg = toy_config(fold=fold, outer_tol=0.0, inner_max_steps=6, r=2, alpha=3.0)
    trainer, state, model, teacher = make(cfg.replace(target_modules=("m1", "m3")))
    w0 = {p: np.asarray(k, np.float64) for p, k in trainer.kernels(state.base).items()}
    s, r, seen = cfg.scale, cfg.r, 0
    for batch in batches(teacher, model, 32, 30):
        state, info = trainer.step(state, batch)
        if not bool(info.outer):
            continue
        for i, p in enumerate(trainer.paths):
            assert bool(info.merged[i])
            m = int(state.adapters.merges[p])  # the merged pair is in slot m - 1
            fa = np.asarray(state.adapters.frozen[p].a, np.float64)
            fb = np.asarray(state.adapters.frozen[p].b, np.float64)
            before = w0[p] + s * fa[:, : (m - 1) * r] @ fb[: (m - 1) * r]
            pair = fa[:, (m - 1) * r : m * r] @ fb[(m - 1) * r : m * r]
            want = s * np.linalg.norm(pair) / np.linalg.norm(before)
            np.testing.assert_allclose(float(info.rho_out[i]), want, rtol=2e-5)
            if fold == "auto":  # the folded kernel holds W0 + dW, this pair included
                k = np.asarray(trainer.kernels(state.base)[p], np.float64)
                np.testing.assert_allclose(k, before + s * pair, atol=1e-5)
        seen += 1
    assert seen == 5  # outer steps at 6, 12, ..., 30: up to four merges behind eq. 6


@pytest.mark.parametrize("r", [1, 4])
def test_bf16_bases_keep_factors_and_train_in_bf16(r):
    """bf16 kernels computing in bf16: nothing folds, merges fill the factor slots, and the
    adapted model is W0 + s (A B + a b) within bf16 precision."""
    model, student, teacher = make_problem(0)
    student16 = jax.tree.map(lambda k: k.astype(jnp.bfloat16), student)

    def loss_fn(params, batch, rng):
        pred = model.apply({"params": params}, batch["x"].astype(jnp.bfloat16))
        return jnp.mean(jnp.sum((pred.astype(jnp.float32) - batch["y"]) ** 2, axis=-1))

    cfg = toy_config(outer_tol=0.0, inner_max_steps=10, r=r)
    trainer = AromaTrainer(loss_fn, student16, cfg, donate=False)
    assert trainer.folded == frozenset()
    state = trainer.init(student16)
    losses, outer = [], 0
    for batch in batches(teacher, model, 32, 35):
        state, info = trainer.step(state, batch)
        losses.append(float(info.loss))
        outer += int(info.outer)
    assert trainer.compiles == 1 and outer >= 3
    # bf16 rounding leaves m0 (planted rank 0) a non-zero gradient, so its pairs merge too
    assert trainer.ranks(state) == {p: outer * r for p in trainer.paths}
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    x = jax.random.normal(jax.random.key(7), (16, D_IN)).astype(jnp.bfloat16)
    got = np.asarray(outputs(trainer, state, model, x), np.float32)
    want = []
    for p in sorted(trainer.paths):
        fz, pair = state.adapters.frozen[p], state.adapters.pairs[p]
        dw = cfg.scale * (fz.a @ fz.b + pair.a @ pair.b)
        w = np.asarray(student16[p]["kernel"], np.float32) + np.asarray(dw)
        want.append(np.asarray(x, np.float32) @ w)
    want = np.concatenate(want, axis=-1)
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()


def _set_ratios(trainer, state, ratios):
    """``state`` with each module's pair scaled so eq. 6 gives ``ratios[p]`` (W0 alone, rank 0)."""
    s, pairs = trainer.cfg.scale, dict(state.adapters.pairs)
    for p, ratio in ratios.items():
        w = np.linalg.norm(np.asarray(trainer.kernels(state.base)[p], np.float64))
        a = np.asarray(pairs[p].a, np.float64)
        b = np.random.default_rng(len(p)).normal(size=pairs[p].b.shape)
        b *= ratio * w / (s * np.linalg.norm(a @ b))
        pairs[p] = pairs[p]._replace(b=jnp.asarray(b, jnp.float32))
    return state._replace(adapters=state.adapters._replace(pairs=pairs))


def test_eq6_at_0_9_and_1_1_outer_tol_and_moments_bit_for_bit_after_a_prune():
    """Pairs at 0.9x outer_tol stop (discarded, done, no more updates), at 1.1x merge; the
    merged pairs' Adam moments after the step's prune are the unpruned step's moments with
    exactly the entries `adapters.prune_keep` drops (the step's own reset key) set to zero."""
    tol = 0.05
    cfg = toy_config(
        outer_tol=tol,
        inner_max_steps=1,
        learning_rate=1e-9,
        warmup_steps=0,
        reset="prune",
        prune_ratio=0.5,
    )
    trainer, state, model, teacher = make(cfg)
    ratios = {"m0": 1.1 * tol, "m1": 0.9 * tol, "m3": 1.1 * tol}
    state = _set_ratios(trainer, state, ratios)
    plain = AromaTrainer(
        loss_for(model), make_problem(0)[1], cfg.replace(reset="none"), donate=False
    )
    batch = next(batches(teacher, model, 32, 1))
    new, info = trainer.step(state, batch)
    unpruned, _ = plain.step(state, batch)
    assert bool(info.outer)
    np.testing.assert_allclose(info.rho_out, [ratios[p] for p in trainer.paths], rtol=1e-4)
    np.testing.assert_array_equal(info.merged, [True, False, True])
    np.testing.assert_array_equal(info.newly_done, [False, True, False])
    assert trainer.ranks(new) == {"m0": 1, "m1": 0, "m3": 1}
    assert not np.any(new.adapters.pairs["m1"].a) and not np.any(new.adapters.pairs["m1"].b)
    reset_rng = AromaTrainer.split_keys(state)[2]
    keep = adapters_lib.prune_keep(reset_rng, trainer.specs, new.adapters.pairs, 0.5)
    adam, adam_unpruned = new.opt_state.inner[0], unpruned.opt_state.inner[0]
    zeroed = 0
    for p, merged in zip(trainer.paths, info.merged.tolist(), strict=True):
        for moment in ("mu", "nu"):
            got = getattr(adam, moment)["pairs"][p]
            full = getattr(adam_unpruned, moment)["pairs"][p]
            for leaf in ("a", "b"):
                k, g, f = (np.asarray(getattr(t, leaf)) for t in (keep[p], got, full))
                want = np.where(~k, 0.0, f).astype(f.dtype) if merged else f
                np.testing.assert_array_equal(g, want, err_msg=f"{p} {moment} {leaf}")
                zeroed += int(np.sum(merged & ~k & (f != 0)))
    assert zeroed > 20  # the prune removed real (non-zero) moments
    # The stopped module gets no update from now on: pair, slots and moments stay.
    after, _ = trainer.step(new, next(batches(teacher, model, 32, 1, seed=5)))
    for x, y in zip(
        jax.tree.leaves((new.adapters.pairs["m1"], new.adapters.frozen["m1"])),
        jax.tree.leaves((after.adapters.pairs["m1"], after.adapters.frozen["m1"])),
        strict=True,
    ):
        np.testing.assert_array_equal(x, y)


def test_rewarmup_reaches_only_the_pairs_just_reset():
    """After an outer step that merged (and reset) the pairs, their next update runs at
    1/rewarmup_steps of the rate; after one where every module was capacity-full (nothing
    reset), the pairs keep the base rate: the update equals a no-re-warmup run's bit for bit."""
    cfg = toy_config(
        outer_tol=0.0, inner_max_steps=5, rank_capacity=3, rewarmup_steps=10, warmup_steps=0
    )
    trainer, state, model, teacher = make(cfg)
    state = _set_ratios(trainer, state, {"m0": 0.1, "m1": 0.1, "m3": 0.1})
    flat = AromaTrainer(
        loss_for(model), make_problem(0)[1], cfg.replace(rewarmup_steps=0), donate=False
    )
    stream = batches(teacher, model, 32, 17)
    seen = []
    for step in range(1, 16):  # outer steps at 5 and 10 merge (2 growth slots), at 15 all full
        state, info = trainer.step(state, next(stream))
        if step not in (10, 15):
            continue
        assert bool(info.outer)
        assert bool(np.all(info.merged)) if step == 10 else bool(np.all(info.full))
        batch = next(batches(teacher, model, 32, 1, seed=step))
        rewarmed, _ = trainer.step(state, batch)
        plain, _ = flat.step(state, batch)
        for p in trainer.paths:  # b: a fresh pair's a gets no gradient while b = 0
            moved = np.asarray(rewarmed.adapters.pairs[p].b - state.adapters.pairs[p].b)
            moved_plain = np.asarray(plain.adapters.pairs[p].b - state.adapters.pairs[p].b)
            assert np.abs(moved_plain).max() > 0
            if step == 10:  # just reset: 1/10 of the rate
                np.testing.assert_allclose(moved, moved_plain / 10, rtol=1e-3, atol=1e-12)
            else:
                np.testing.assert_array_equal(moved, moved_plain)
        seen.append(step)
    assert seen == [10, 15] and trainer.ranks(state) == {"m0": 2, "m1": 2, "m3": 2}


def test_one_compile_over_several_outer_steps_and_rewarmup_at_actual_steps():
    cfg = toy_config(max_steps=700)
    trainer, state, model, teacher = make(cfg, donate=True)
    state, history = loop.run(trainer, state, batches(teacher, model, 64, 700))
    outer = history.outer_step_numbers()
    assert len(outer) >= 3
    assert trainer.compiles == 1
    # Re-warmups follow the adaptive outer steps: the update right after each outer step runs
    # at 1/rewarmup of the base rate, ramping back to it.
    lr = {s["step"]: s["lr"] for s in history.steps}
    for s in outer:
        if s + cfg.rewarmup_steps + 1 in lr:
            assert lr[s + 1] == pytest.approx(cfg.learning_rate / cfg.rewarmup_steps, rel=1e-5)
            assert lr[s + cfg.rewarmup_steps] == pytest.approx(cfg.learning_rate, rel=1e-5)
    assert lr[outer[0]] == pytest.approx(cfg.learning_rate)  # no grid: only actual steps
    # Inner-check history: the first check after each outer step never converges.
    first_after = [r for r in history.inner_checks if r["step"] - cfg.inner_check_every in outer]
    assert first_after and all(r["rho_in"] == np.inf for r in first_after)


def test_inner_rank_r_greater_than_one():
    cfg = toy_config(r=4, alpha=4.0, max_steps=600)
    trainer, state, model, teacher = make(cfg, donate=True)
    state, history = loop.run(trainer, state, batches(teacher, model, 64, 600))
    ranks = trainer.ranks(state)
    assert all(v % 4 == 0 for v in ranks.values())
    assert ranks["m3"] >= 4 and ranks["m0"] == 0
    assert history.steps[-1]["loss"] < 0.2 * history.steps[0]["loss"]
    assert trainer.compiles == 1


def test_fold_and_factors_give_the_same_run():
    res = {}
    for fold in ("never", "auto"):
        cfg = toy_config(fold=fold, max_steps=500)
        trainer, state, model, teacher = make(cfg, donate=True)
        state, history = loop.run(trainer, state, batches(teacher, model, 64, 500))
        res[fold] = (trainer.ranks(state), history.outer_steps, history.steps[-1]["loss"])
    assert res["never"][0] == res["auto"][0]
    rho_n = [r["rho_out"] for r in res["never"][1]]
    rho_a = [r["rho_out"] for r in res["auto"][1]]
    np.testing.assert_allclose(rho_n, rho_a, rtol=1e-3, atol=1e-5)
    assert res["never"][2] == pytest.approx(res["auto"][2], rel=1e-2, abs=1e-4)


def test_lora_never_merges_and_relora_merges_on_a_fixed_period():
    lora_cfg = toy_config(method="lora", r=8, alpha=8.0, max_steps=100)
    trainer, state, model, teacher = make(lora_cfg, donate=True)
    state, history = loop.run(trainer, state, batches(teacher, model, 32, 100))
    assert history.outer_step_numbers() == []
    final = trainer.finalize(state)
    assert trainer.ranks(final) == {"m0": 0, "m1": 8, "m3": 8}
    x = jax.random.normal(jax.random.key(1), (8, D_IN))
    np.testing.assert_allclose(
        outputs(trainer, final, model, x), outputs(trainer, state, model, x), atol=1e-5
    )

    relora_cfg = toy_config(method="relora", inner_max_steps=25, max_steps=100)
    trainer, state, model, teacher = make(relora_cfg, donate=True)
    state, history = loop.run(trainer, state, batches(teacher, model, 32, 100))
    assert history.outer_step_numbers() == [25, 50, 75, 100]
    assert not any(bool(d) for d in jax.device_get(state.adapters.done).values())


def test_without_reset_keeps_optimizer_state():
    cfg = toy_config(reset="none", outer_tol=0.0, inner_max_steps=20)
    trainer, state, model, teacher = make(cfg)
    for batch in batches(teacher, model, 32, 19):
        state, _ = trainer.step(state, batch)
    nu_before = jax.device_get(state.opt_state.inner[0].nu["pairs"]["m3"])
    state, info = trainer.step(state, next(batches(teacher, model, 32, 1, seed=5)))
    assert bool(info.outer)
    nu_after = state.opt_state.inner[0].nu["pairs"]["m3"]
    # Decayed by one Adam step only: nothing zeroed.
    assert float(jnp.sum(nu_after.b == 0)) == float(np.sum(nu_before.b == 0))


# ----------------------------------------------------------------- no dense update anywhere
def dense_outputs(jaxpr, shape, inside_cond=False, found=None):
    """(primitive, inside a cond branch) for every equation producing an array of ``shape``."""
    found = [] if found is None else found
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            if tuple(getattr(v.aval, "shape", ())) == shape:
                found.append((eqn.primitive.name, inside_cond))
        for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else _subs(eqn):
            dense_outputs(sub, shape, inside_cond or eqn.primitive.name == "cond", found)
    return found


def _subs(eqn):
    for param in eqn.params.values():
        for p in param if isinstance(param, (tuple, list)) else (param,):
            if hasattr(p, "jaxpr") and hasattr(p.jaxpr, "eqns"):
                yield p.jaxpr
            elif hasattr(p, "eqns"):
                yield p


def step_jaxpr(cfg):
    # Capacity * r must differ from D_IN (32) so frozen factors never share the kernel's shape.
    cfg = cfg.replace(rank_capacity=5)
    trainer, state, model, teacher = make(cfg)
    batch = next(batches(teacher, model, 8, 1))
    return jax.make_jaxpr(trainer._step_impl)(state, batch).jaxpr


def test_detector_catches_a_naive_dense_update():
    def naive(w, a, b, x):
        return x @ (w + a @ b)

    jaxpr = jax.make_jaxpr(naive)(
        jnp.ones((D_IN, D_OUT)), jnp.ones((D_IN, 1)), jnp.ones((1, D_OUT)), jnp.ones((4, D_IN))
    ).jaxpr
    assert dense_outputs(jaxpr, (D_IN, D_OUT))


@pytest.mark.parametrize("r", [1, 3])
def test_train_step_forms_no_dense_update_with_factors(r):
    jaxpr = step_jaxpr(toy_config(fold="never", r=r))
    assert dense_outputs(jaxpr, (D_IN, D_OUT)) == []


def test_train_step_folds_only_inside_the_outer_step():
    found = dense_outputs(step_jaxpr(toy_config(fold="auto")), (D_IN, D_OUT))
    assert found, "folding writes the kernel at merges"
    outside = [f for f in found if not f[1] and f[0] != "cond"]
    assert outside == []
