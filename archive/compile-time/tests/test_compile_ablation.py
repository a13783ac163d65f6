"""experiments/compile_ablation.py's ablations, applied in-process (undone after each test).

The script's end-to-end run is in tests/test_bench.py; here each replacement is checked on the
toy problem (the layer loop on a layer-stacked one): it compiles a different program,
``outer-step-alone`` computes exactly the outer step of the full one, and the rewrites that
should compute the same step do.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aroma_jax import AromaTrainer
from aroma_jax.examples.toy import D_IN, batches, make_problem, squared_error_loss, toy_config
from tests.test_bench import load_experiment

ABLATION = load_experiment("compile_ablation")
CAP = 50  # the toy's inner step cap here: at inner_t == CAP the outer step is due


def capped_config(**overrides):
    """The toy's settings with the inner loop capped at ``CAP`` and eq. 5 and 6 never firing,
    on m1 and m3 (m0's planted rank is 0: its pair never moves, and a zero pair never merges)."""
    overrides.setdefault("target_modules", ("m1", "m3"))
    return toy_config(
        inner_max_steps=CAP,
        inner_check_every=10,
        rank_capacity=32,
        max_steps=400,
        inner_tol=0.0,
        outer_tol=0.0,
        **overrides,
    )


def due(state):
    """``state`` one step before the cap: its next step is an outer step."""
    return state._replace(ctrl=state.ctrl._replace(inner_t=jnp.asarray(CAP - 1, jnp.int32)))


def three_steps(trainer, state, batch, merged=None):
    """``([an ordinary step, a first outer step, a second outer step], merged)``: each step's
    ``(state, info)``; the second outer step starts from ``merged`` (default: the first outer
    step's state), so it has a merge behind it."""
    out = [trainer.step(s, batch) for s in (state, due(state))]
    merged = out[1][0] if merged is None else merged
    return [*out, trainer.step(due(merged), batch)], merged


def assert_same_steps(trainer, got, want) -> None:
    """``got`` equals ``want`` (`three_steps`' lists) leaf for leaf, and ``want`` is what it
    should be: no outer step, then two at which every module merges (rank 2 after them)."""
    assert not bool(want[0][1].outer)
    assert bool(want[1][1].merged.all()) and bool(want[2][1].merged.all())
    assert trainer.ranks(want[2][0]) == {p: 2 for p in trainer.paths}
    for (g_state, g_info), (w_state, w_info) in zip(got, want, strict=True):
        for a, b in zip(host((g_state, g_info)), host((w_state, w_info)), strict=True):
            np.testing.assert_array_equal(a, b)


def trained_toy(steps: int = 30, **overrides):
    """A trainer and a state after ``steps`` steps (no outer step yet), the model, a batch."""
    model, student, teacher = make_problem(0)
    cfg = capped_config(**overrides)
    trainer = AromaTrainer(squared_error_loss(model), student, cfg, donate=False)
    state = trainer.init(student)
    data = batches(teacher, model, 32, steps + 1)
    for _ in range(steps):
        state, info = trainer.step(state, next(data))
        assert not bool(info.outer)
    return trainer, state, model, next(data)


def program(trainer, state, batch) -> str:
    """The traced step (StableHLO, no source locations): what an ablation changes."""
    return trainer._step.lower(state, batch).as_text(debug_info=False)


def rebuilt(trainer, state) -> AromaTrainer:
    """A new trainer like ``trainer``: its step is traced with whatever is patched now."""
    return AromaTrainer(trainer.loss_fn, {"params": state.base}, trainer.cfg, donate=False)


def host(tree):
    """Every leaf as a numpy array (PRNG keys as their key data)."""
    raw = lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
    return [np.asarray(raw(x)) for x in jax.tree.leaves(tree)]


# Ablations that change only how a layer-stacked module's layers are mapped over.
STACKED_ONLY = ("outer-step-layer-loop",)
# Eq. 6's <W0, A B> in another contraction order: whether the program changes depends on the
# kernels' shapes.
CONTRACTION_ORDER = ("eq6-contract-out-first", "eq6-contract-larger-first")
# Ablations that change how the state is made (its keys), not the step's code.
NEW_STATE = ("rbg-keys",)


def test_every_ablation_compiles_another_program(monkeypatch):
    # fold="never": eq. 6 reads the factors (with folded kernels it reads the kernel's norm).
    trainer, state, _, batch = trained_toy(steps=2, fold="never")
    # each module's a draws 32 entries (one vmapped draw): 2 chunks of 16
    monkeypatch.setattr(ABLATION, "FRESH_CHUNK", 16)
    full = program(trainer, state, batch)
    seen = {full}
    for name, ablate in ABLATION.ABLATIONS.items():
        if name in STACKED_ONLY + CONTRACTION_ORDER:  # see their own tests
            continue
        with monkeypatch.context() as m:
            ablate(m.setattr)
            new = rebuilt(trainer, state)
            # rbg-keys changes the keys the state is made with, so the state is made again.
            st = new.init({"params": state.base}) if name in NEW_STATE else state
            text = program(new, st, batch)
        assert text not in seen, f"{name} compiled a program already seen"
        seen.add(text)
    assert program(rebuilt(trainer, state), state, batch) == full  # every patch undone


def test_outer_step_alone_is_the_full_steps_outer_step(monkeypatch):
    trainer, state, model, batch = trained_toy()
    x = jax.random.normal(jax.random.key(3), (8, D_IN))

    def outputs(tr, st):
        with tr.applied(st) as params:
            return model.apply({"params": params}, x)

    with monkeypatch.context() as m:
        ABLATION.ABLATIONS["outer-step-alone"](m.setattr)
        alone = rebuilt(trainer, state)
        # Not due: nothing changes, not even the pairs (no gradient step in this program).
        same, info = alone.step(state, batch)
        assert not bool(info.merged.any())
        for a, b in zip(host(same), host(state), strict=True):
            np.testing.assert_array_equal(a, b)
        # Due (the cap): every module merges, and the model computes the same function.
        at_cap = state._replace(ctrl=state.ctrl._replace(inner_t=jnp.asarray(CAP, jnp.int32)))
        merged, info = alone.step(at_cap, batch)
    assert bool(info.merged.all()) and alone.compiles == 1
    np.testing.assert_allclose(outputs(trainer, merged), outputs(trainer, at_cap), atol=1e-5)
    assert trainer.ranks(merged) == {p: 1 for p in trainer.paths}
    # The full step at the cap: its gradient step, then this very outer step, same keys.
    stepped, full_info = trainer.step(due(state), batch)
    assert bool(full_info.outer) and bool(full_info.merged.all())
    for p in trainer.paths:
        # The re-initialised pairs come from the same draws: the controller key is the same.
        np.testing.assert_array_equal(stepped.adapters.pairs[p].a, merged.adapters.pairs[p].a)
        assert float(jnp.abs(merged.adapters.pairs[p].b).max()) == 0.0


@pytest.mark.parametrize("name", ["no-outer-step"])
def test_no_outer_step_never_merges(monkeypatch, name):
    trainer, state, _, batch = trained_toy(steps=2)
    with monkeypatch.context() as m:
        ABLATION.ABLATIONS[name](m.setattr)
        _, info = rebuilt(trainer, state).step(due(state), batch)
    assert not bool(info.outer) and not bool(info.merged.any())


@pytest.mark.parametrize("name", ["packed-operands", "eq6-base-norm-every-step"])
def test_rearranged_steps_compute_the_same_step(monkeypatch, name):
    # Data moved around the outer step's lax.cond, or eq. 6's base norm computed before it: the
    # same state leaf for leaf at an ordinary step and at two outer steps (every module merges;
    # fold="never", so eq. 6 reads the frozen factors), the second with a merge behind it, so
    # eq. 6's product of each kernel with its frozen factors is not zero.
    trainer, state, _, batch = trained_toy(fold="never")

    want, merged = three_steps(trainer, state, batch)
    with monkeypatch.context() as m:
        ABLATION.ABLATIONS[name](m.setattr)
        rearranged = rebuilt(trainer, state)
        got, _ = three_steps(rearranged, state, batch, merged)
    assert_same_steps(trainer, got, want)


def stacked_toy():
    """A trainer whose two adapted modules are layer-stacked (tests/core/test_stacked.py's
    model: 3 layers under ``nn.scan``), its state after 2 steps, and a batch."""
    from tests.core.test_stacked import D, L, Scanned, _data, _trainer

    params = Scanned().init(jax.random.key(0), jnp.ones((1, D)))["params"]
    cfg = capped_config(target_modules=("up", "down"), fold="never")
    trainer = _trainer(Scanned(), params, cfg, stacked={"layers": L})
    batch = _data()
    state = trainer.init(params)
    for _ in range(2):
        state, _ = trainer.step(state, batch)
    return trainer, state, batch


@pytest.mark.parametrize("name", STACKED_ONLY)
def test_stacked_only_ablations_compute_the_same_step(monkeypatch, name):
    # The layers mapped over by a loop instead of vmap: another program (a loop over layers),
    # the same state leaf for leaf at an ordinary step and at two outer steps, the second with a
    # merge behind it (eq. 6's product of each kernel with its frozen factors is not zero).
    trainer, state, batch = stacked_toy()
    assert len(trainer.paths) == 6 and all(
        trainer.specs[p].lead == (3,) for p in trainer.module_paths
    )

    def again(tr):
        return AromaTrainer(
            tr.loss_fn, {"params": state.base}, tr.cfg, donate=False, stacked={"layers": 3}
        )

    want, merged = three_steps(trainer, state, batch)
    with monkeypatch.context() as m:
        ABLATION.ABLATIONS[name](m.setattr)
        rearranged = again(trainer)
        got, _ = three_steps(rearranged, state, batch, merged)
        text = program(rearranged, state, batch)
    assert text != program(again(trainer), state, batch)
    assert text.count("stablehlo.while") > program(trainer, state, batch).count("stablehlo.while")
    assert_same_steps(trainer, got, want)


def test_eq6_contraction_orders_give_the_same_ratios(monkeypatch):
    # The toy's kernels are 32 x 24: "larger first" is the library's order (the input axis), so
    # its program is the library's; "out first" is another program. Both give the same eq. 6
    # ratios (to rounding) and the same state at an ordinary step and at two outer steps, the
    # second with a merge behind it (<W0, A B> over the frozen factors is not zero).
    trainer, state, _, batch = trained_toy(fold="never")
    full = program(trainer, state, batch)

    want, merged = three_steps(trainer, state, batch)
    assert trainer.ranks(want[2][0]) == {p: 2 for p in trainer.paths}
    for name, same_program in zip(CONTRACTION_ORDER, (False, True), strict=True):
        with monkeypatch.context() as m:
            ABLATION.ABLATIONS[name](m.setattr)
            other = rebuilt(trainer, state)
            assert (program(other, state, batch) == full) == same_program, name
            got, _ = three_steps(other, state, batch, merged)
        for (g_state, g_info), (w_state, w_info) in zip(got, want, strict=True):
            for a, b in zip(host(g_state), host(w_state), strict=True):
                np.testing.assert_array_equal(a, b)
            np.testing.assert_allclose(g_info.rho_out, w_info.rho_out, rtol=1e-5)
            np.testing.assert_array_equal(g_info.merged, w_info.merged)
        assert np.isfinite(np.asarray(got[2][1].rho_out)).all()


def test_fresh_draw_in_chunks_draws_kaiming_uniform_pairs(monkeypatch):
    # Two chunks of 16 for each of the toy's 32 x 1 pairs (each drawn from its module's own
    # key): each module gets its own draws, inside the Kaiming bound, not the library's.
    trainer, state, _, batch = trained_toy(steps=2)
    want, _ = trainer.step(due(state), batch)
    monkeypatch.setattr(ABLATION, "FRESH_CHUNK", 16)
    with monkeypatch.context() as m:
        ABLATION.ABLATIONS["fresh-draw-in-chunks"](m.setattr)
        got, info = rebuilt(trainer, state).step(due(state), batch)
    assert bool(info.merged.all())
    fresh = [np.asarray(got.adapters.pairs[p].a) for p in trainer.paths]
    bound = 1.0 / np.sqrt(D_IN)
    for p, a in zip(trainer.paths, fresh, strict=True):
        assert a.shape == (D_IN, 1) and np.all(np.abs(a) <= bound) and a.std() > bound / 4
        assert not np.array_equal(a, np.asarray(want.adapters.pairs[p].a))
    assert not np.array_equal(fresh[0], fresh[1])
