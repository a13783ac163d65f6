"""Gradient accumulation: k micro-batches of B/k give the run of one batch of B.

The controller, the optimizer and the draws advance once per optimizer step, so every decision
(inner checks, eq. 5 labels, outer steps, merges, done modules, ranks) is equal and the losses
agree within float summation order. Token-weighted losses combine by token counts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aroma_jax import AromaTrainer
from aroma_jax.core import accumulate
from aroma_jax.core.config import ConfigError
from aroma_jax.examples.toy import D_IN, batches, make_problem, squared_error_loss, toy_config

DECISIONS = (
    "step",
    "checked",
    "outer",
    "merged",
    "newly_done",
    "ranks",
    "finished",
    "by_cap",
    "converged",
    "full",
    "inner_label",
)
RATIOS = ("loss", "lr", "rho_in", "rho_out")


def toy_run(cfg, k, steps, batch_size=32, **trainer_kw):
    model, student, teacher = make_problem(0)
    trainer = AromaTrainer(
        squared_error_loss(model), student, cfg, donate=False, grad_accum=k, **trainer_kw
    )
    state = trainer.init(student)
    infos = []
    for batch in batches(teacher, model, batch_size, steps):
        state, info = trainer.step(state, batch)
        infos.append(jax.device_get(info))
    return trainer, state, infos


def rel_diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a)  # NaN where no check or outer step ran; inf: a check after a re-init
    np.testing.assert_array_equal(np.where(ok, 0.0, a), np.where(ok, 0.0, b))
    return float(np.max(np.abs(a[ok] - b[ok]) / np.maximum(np.abs(b[ok]), 1e-12), initial=0.0))


def assert_same_run(infos_k, infos_1, rtol=1e-5):
    """Every decision equal at every step; the float outputs within ``rtol``; returns the
    largest relative difference per float field."""
    assert len(infos_k) == len(infos_1)
    worst = dict.fromkeys(RATIOS, 0.0)
    for t, (a, b) in enumerate(zip(infos_k, infos_1, strict=True)):
        for f in DECISIONS:
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f"{f} @ {t}")
        for f in RATIOS:
            worst[f] = max(worst[f], rel_diff(getattr(a, f), getattr(b, f)))
    assert max(worst.values()) < rtol, worst
    return worst


def aroma_cfg(**kw):
    # short inner loops so that 60 steps hold several outer steps, eq. 5 exits and eq. 6 stops
    base = dict(
        inner_check_every=4,
        inner_max_steps=16,
        inner_tol=0.3,
        outer_tol=0.01,
        max_steps=60,
        warmup_steps=4,
        rewarmup_steps=4,
        schedule="linear",
    )
    return toy_config(**{**base, **kw})


def test_aroma_k4_of_b8_is_the_run_of_one_batch_of_32():
    cfg = aroma_cfg()
    t4, s4, i4 = toy_run(cfg, 4, 60)
    t1, s1, i1 = toy_run(cfg, 1, 60)
    worst = assert_same_run(i4, i1)
    print(f"aroma toy k=4 vs k=1, max relative difference: {worst}")
    outer = [int(i.step) for i in i1 if bool(i.outer)]
    assert len(outer) >= 3 and any(bool(i.outer) and not bool(i.by_cap) for i in i1)
    assert any(bool(np.any(i.newly_done)) for i in i1)  # eq. 6 stopped a module
    assert t4.ranks(s4) == t1.ranks(s1)
    # Adam's count and the controller's clock count optimizer steps, not micro-batches
    # (the run ends at step 48, when eq. 6 has stopped every module)
    assert int(s4.opt_state.count) == int(s1.opt_state.count)
    assert int(s4.ctrl.step) == int(s1.ctrl.step) == 48 and bool(s4.ctrl.finished)
    assert t4.compiles == 1


@pytest.mark.parametrize(
    "method,kw",
    [
        ("lora", {"r": 2}),
        ("relora", {"r": 2}),
        ("dora", {"r": 2}),
        ("adalora", dict(init_r=3, target_r=1, tinit=2, tfinal=4, delta_t=2, orth_reg_weight=0.1)),
        ("head", {"train_patterns": ("m0",), "target_modules": ("m1", "m3")}),
    ],
)
def test_every_method_accumulates_to_the_full_batch(method, kw):
    # relora's resets follow the outer steps; adalora's budget reads the accumulated gradient
    # (its importance scores) and its orthogonality term is added once, not once per micro-step
    cfg = aroma_cfg(method=method, max_steps=16, **kw)
    t2, s2, i2 = toy_run(cfg, 2, 16)
    _, s1, i1 = toy_run(cfg, 1, 16)
    worst = assert_same_run(i2, i1)
    print(f"{method} toy k=2 vs k=1, max relative difference: {worst}")
    assert t2.compiles == 1
    for a, b in zip(jax.tree.leaves(s2.adapters), jax.tree.leaves(s1.adapters), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(s2.extra), jax.tree.leaves(s1.extra), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def token_mean_loss(params, batch, rng):
    """A token-averaged loss over a padded batch, as the LM objectives compute it."""
    pred = batch["x"] @ params["w"]  # (B, T)
    mask = batch["mask"].astype(jnp.float32)
    return jnp.sum((pred - batch["y"]) ** 2 * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def padded_batch():
    rng = np.random.default_rng(0)
    b, t, d = 8, 6, 5
    lengths = np.array([6, 1, 5, 0, 6, 2, 4, 1])  # very unequal, one all-padding row
    return {
        "x": jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(b, t)), jnp.float32),
        "mask": jnp.asarray(np.arange(t)[None, :] < lengths[:, None], jnp.int32),
    }


def test_token_weighting_gives_the_full_batch_gradient_not_a_mean_of_micro_means():
    batch = padded_batch()
    params = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(5,)), jnp.float32)}
    tokens = lambda b: jnp.sum(b["mask"])
    full_loss, full = jax.value_and_grad(token_mean_loss)(params, batch, None)
    for k in (2, 4, 8):  # k = 8: single-row micro-batches, one of them all padding
        loss, grads = jax.jit(
            lambda p, b, k=k: accumulate.accumulated_grads(token_mean_loss, p, b, None, k, tokens)
        )(params, batch)
        np.testing.assert_allclose(loss, full_loss, rtol=1e-6)
        np.testing.assert_allclose(grads["w"], full["w"], rtol=1e-5, atol=1e-7)
    # the mean of micro-means (no weight) is a different gradient on this batch: the test above
    # would catch it
    _, naive = accumulate.accumulated_grads(token_mean_loss, params, batch, None, 4)
    assert np.max(np.abs(naive["w"] - full["w"])) > 0.05 * np.max(np.abs(full["w"]))


def test_trainer_weights_micro_batches_by_their_tokens():
    """Through the step: a padded token-averaged batch, k=4 weighted by its token counts
    equals k=1 (the unweighted mean of micro-means differs: the test above)."""
    import flax.linen as nn

    model = nn.Sequential([nn.Dense(1, use_bias=False)])  # one Dense at "layers_0"
    params = model.init(jax.random.key(0), jnp.ones((1, 5)))["params"]

    def loss_fn(p, b, rng):
        pred = model.apply({"params": p}, b["x"])[..., 0]
        mask = b["mask"].astype(jnp.float32)
        return jnp.sum((pred - b["y"]) ** 2 * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    cfg = toy_config(target_modules=("layers_0",), max_steps=3, warmup_steps=0, learning_rate=0.05)
    batch = padded_batch()
    tokens = lambda b: jnp.sum(b["mask"])
    runs = {}
    for name, k, weight in (("full", 1, None), ("tokens", 4, tokens)):
        trainer = AromaTrainer(loss_fn, params, cfg, donate=False, grad_accum=k, loss_weight=weight)
        state, losses = trainer.init(params), []
        for _ in range(3):
            state, info = trainer.step(state, batch)
            losses.append(float(info.loss))
        runs[name] = (np.array(losses), np.asarray(state.adapters.pairs["layers_0"].b))
    np.testing.assert_allclose(runs["tokens"][0], runs["full"][0], rtol=1e-6)
    np.testing.assert_allclose(runs["tokens"][1], runs["full"][1], rtol=1e-5, atol=1e-7)
    assert np.abs(runs["full"][1]).max() > 0  # the pair moved


def test_bad_grad_accum_and_batches_that_do_not_split():
    model, student, _ = make_problem(0)
    for bad in (0, -2, 1.5, True, "4"):
        with pytest.raises(ConfigError, match="accepted a positive integer"):
            AromaTrainer(squared_error_loss(model), student, toy_config(), grad_accum=bad)
    trainer = AromaTrainer(squared_error_loss(model), student, toy_config(), grad_accum=3)
    batch = {"x": jnp.ones((8, D_IN)), "y": jnp.zeros((8, 72))}
    with pytest.raises(accumulate.AccumulationError, match="divisible by grad_accum"):
        trainer.step(trainer.init(student), batch)
    # a strided split: micro-batch j holds rows j, j + k, ...
    micro = accumulate.split({"r": jnp.arange(8)}, 4)["r"]
    np.testing.assert_array_equal(micro, [[0, 4], [1, 5], [2, 6], [3, 7]])
