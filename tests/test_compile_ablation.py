"""experiments/compile_ablation.py's ablations, applied in-process (undone after each test).

The script's end-to-end run is in tests/test_bench.py; here each replacement is checked on the
toy problem: it compiles a different program, and ``outer-step-alone`` computes exactly the
outer step of the full one.
"""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aroma_jax import AromaTrainer
from aroma_jax.examples.toy import D_IN, batches, make_problem, squared_error_loss, toy_config

ROOT = Path(__file__).resolve().parent.parent


def load_ablation():
    spec = importlib.util.spec_from_file_location(
        "compile_ablation", ROOT / "experiments" / "compile_ablation.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ABLATION = load_ablation()
CAP = 50  # the toy's inner step cap here: at inner_t == CAP the outer step is due


def trained_toy(steps: int = 30, **overrides):
    """A trainer and a state after ``steps`` steps (no outer step yet), the model, a batch."""
    model, student, teacher = make_problem(0)
    cfg = toy_config(
        inner_max_steps=CAP,
        inner_check_every=10,
        rank_capacity=32,
        max_steps=400,
        inner_tol=0.0,
        outer_tol=0.0,
        **overrides,
    )
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


def test_every_ablation_compiles_another_program(monkeypatch):
    # fold="never": eq. 6 reads the factors (with folded kernels it reads the kernel's norm).
    trainer, state, _, batch = trained_toy(steps=2, fold="never")
    full = program(trainer, state, batch)
    seen = {full}
    for name, ablate in ABLATION.ABLATIONS.items():
        with monkeypatch.context() as m:
            ablate(m.setattr)
            text = program(rebuilt(trainer, state), state, batch)
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
        due = state._replace(ctrl=state.ctrl._replace(inner_t=jnp.asarray(CAP, jnp.int32)))
        merged, info = alone.step(due, batch)
    assert bool(info.merged.all()) and alone.compiles == 1
    np.testing.assert_allclose(outputs(trainer, merged), outputs(trainer, due), atol=1e-5)
    assert trainer.ranks(merged) == {p: 1 for p in trainer.paths}
    # The full step at the cap: its gradient step, then this very outer step, same keys.
    before_cap = state._replace(ctrl=state.ctrl._replace(inner_t=jnp.asarray(CAP - 1, jnp.int32)))
    stepped, full_info = trainer.step(before_cap, batch)
    assert bool(full_info.outer) and bool(full_info.merged.all())
    for p in trainer.paths:
        # The re-initialised pairs come from the same draws: the controller key is the same.
        np.testing.assert_array_equal(stepped.adapters.pairs[p].a, merged.adapters.pairs[p].a)
        assert float(jnp.abs(merged.adapters.pairs[p].b).max()) == 0.0


@pytest.mark.parametrize("name", ["no-outer-step"])
def test_no_outer_step_never_merges(monkeypatch, name):
    trainer, state, _, batch = trained_toy(steps=2)
    due = state._replace(ctrl=state.ctrl._replace(inner_t=jnp.asarray(CAP, jnp.int32)))
    with monkeypatch.context() as m:
        ABLATION.ABLATIONS[name](m.setattr)
        _, info = rebuilt(trainer, state).step(due, batch)
    assert not bool(info.outer) and not bool(info.merged.any())


@pytest.mark.parametrize("name", ["packed-operands", "eq6-base-norm-every-step"])
def test_rearranged_steps_compute_the_same_step(monkeypatch, name):
    # Data moved around the outer step's lax.cond, or eq. 6's base norm computed before it: the
    # same state leaf for leaf at an ordinary step and at two outer steps (every module merges;
    # fold="never", so eq. 6 reads the frozen factors), the second with a merge behind it, so
    # eq. 6's product of each kernel with its frozen factors is not zero.
    trainer, state, _, batch = trained_toy(fold="never")

    def due(s):
        return s._replace(ctrl=s.ctrl._replace(inner_t=jnp.asarray(CAP - 1, jnp.int32)))

    want = [trainer.step(s, batch) for s in (state, due(state))]
    merged = want[1][0]
    want.append(trainer.step(due(merged), batch))
    with monkeypatch.context() as m:
        ABLATION.ABLATIONS[name](m.setattr)
        rearranged = rebuilt(trainer, state)
        got = [rearranged.step(s, batch) for s in (state, due(state), due(merged))]
    assert not bool(want[0][1].outer)
    assert bool(want[1][1].merged.all()) and bool(want[2][1].merged.all())
    assert trainer.ranks(want[2][0]) == {p: 2 for p in trainer.paths}
    for (g_state, g_info), (w_state, w_info) in zip(got, want, strict=True):
        for a, b in zip(host((g_state, g_info)), host((w_state, w_info)), strict=True):
            np.testing.assert_array_equal(a, b)
