"""The authors' settings as options: keep-first-pair, LR floor, decay mask, clipping, adapter
dropout; and how each inner loop ended, in the history."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aroma_jax import AromaConfig
from aroma_jax.core import inject, optim
from aroma_jax.core.adapters import Frozen, Pair
from aroma_jax.examples.toy import D_IN, D_OUT, toy_config, train_toy


def test_keep_first_pair_skips_eq6_at_a_modules_first_outer_step():
    # outer_tol so large that eq. 6 stops every module at its first check.
    cfg = toy_config(outer_tol=10.0, inner_max_steps=40, max_steps=120)
    trainer, state, _ = train_toy(cfg, 120)
    assert set(trainer.ranks(state).values()) == {0}
    trainer, state, history = train_toy(cfg.replace(keep_first_pair=True), 120)
    # m1, m3: merged once, then stopped by eq. 6. m0's planted rank is 0: its gradient is exactly
    # zero, and the exemption never merges a zero pair (it would be rank 1 with no update).
    assert trainer.ranks(state) == {"m0": 0, "m1": 1, "m3": 1}
    assert float(jnp.abs(state.adapters.frozen["m0"].b).max()) == 0.0
    first = min(history.outer_step_numbers())
    actions = {r["module"]: r["action"] for r in history.outer_steps if r["step"] == first}
    assert actions == {"m0": "done", "m1": "merged", "m3": "merged"}


def test_history_records_how_each_inner_loop_ended():
    # eq. 5 can only fire from the second check (step 40); T_in=30 ends the first loop by cap.
    cfg = toy_config(inner_max_steps=30, inner_check_every=20, max_steps=30, outer_tol=0.0)
    _, _, history = train_toy(cfg, 30)
    assert {r["trigger"] for r in history.outer_steps} == {"cap"}
    assert not any(r["inner_converged"] for r in history.outer_steps)
    ends = history.inner_loop_endings()
    assert ends["outer_by_cap"] == 1 and ends["outer_by_eq5"] == 0
    # A tolerance every check passes: the loop ends at the second check, by eq. 5 (m0 is left
    # out: its planted rank is 0, its pair never moves and 0/0 never converges).
    cfg = toy_config(inner_tol=1e9, inner_check_every=10, inner_max_steps=1000, max_steps=20)
    cfg = cfg.replace(target_modules=("m1", "m3"))
    _, _, history = train_toy(cfg.replace(outer_tol=0.0), 20)
    assert history.outer_step_numbers() == [20]
    assert {r["trigger"] for r in history.outer_steps} == {"eq5"}
    assert all(r["inner_converged"] for r in history.outer_steps)


def test_min_lr_ratio_floors_linear_and_cosine_decay():
    for schedule in ("linear", "cosine"):
        cfg = AromaConfig(
            target_modules=("x",),
            learning_rate=1.0,
            warmup_steps=0,
            max_steps=100,
            schedule=schedule,
            min_lr_ratio=0.1,
        )
        sched = optim.base_schedule(cfg)
        assert abs(float(sched(99)) - 0.1) < 1e-6  # the last step: the floor, not 0
        assert abs(float(sched(0)) - 1.0) < 0.02
        no_floor = optim.base_schedule(cfg.replace(min_lr_ratio=0.0))
        mid = float(no_floor(49))
        assert abs(float(sched(49)) - (0.1 + 0.9 * mid)) < 1e-6


def test_hf_weight_decay_mask_exempts_biases_norms_and_embeddings():
    trainable = {
        "pairs": {"layer/0/query": Pair(jnp.ones((4, 1)), jnp.ones((1, 4)))},
        "extra": {
            "classifier": {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}},
            "LayerNorm": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
            "embeddings": {"word_embeddings": {"embedding": jnp.ones((8, 4))}},
            "model": {"norm": {"weight": jnp.ones(4)}},
        },
    }
    mask = optim.hf_decay_mask(trainable)
    assert mask["pairs"]["layer/0/query"] == Pair(True, True)
    assert mask["extra"]["classifier"]["dense"] == {"kernel": True, "bias": False}
    assert mask["extra"]["LayerNorm"] == {"scale": False, "bias": False}
    assert mask["extra"]["embeddings"]["word_embeddings"]["embedding"] is False
    assert mask["extra"]["model"]["norm"]["weight"] is False
    # In the optimizer: zero gradients, so a leaf moves only by its own decay.
    cfg = AromaConfig(
        target_modules=("x",),
        learning_rate=0.1,
        weight_decay=0.5,
        warmup_steps=0,
        schedule="constant",
        weight_decay_mask="hf",
    )
    tx = optim.make_optimizer(cfg)
    zeros = jax.tree.map(jnp.zeros_like, trainable)
    upd, _ = tx.update(zeros, tx.init(trainable), trainable)
    assert abs(float(upd["extra"]["classifier"]["dense"]["kernel"][0, 0]) + 0.05) < 1e-7
    assert float(upd["extra"]["classifier"]["dense"]["bias"][0]) == 0.0
    assert abs(float(upd["pairs"]["layer/0/query"].a[0, 0]) + 0.05) < 1e-7
    all_decay = optim.make_optimizer(cfg.replace(weight_decay_mask="all"))
    upd, _ = all_decay.update(zeros, all_decay.init(trainable), trainable)
    assert abs(float(upd["extra"]["classifier"]["dense"]["bias"][0]) + 0.05) < 1e-7


def test_max_grad_norm_clips_the_global_gradient_norm():
    cfg = AromaConfig(
        target_modules=("x",),
        learning_rate=1.0,
        warmup_steps=0,
        schedule="constant",
        max_grad_norm=1.0,
    )
    clipped = optim.make_optimizer(cfg)
    params = {"w": jnp.zeros(2)}
    g = {"w": jnp.array([30.0, 40.0])}  # norm 50
    ref = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(), optax.scale(-1.0))
    u, _ = clipped.update(g, clipped.init(params), params)
    r, _ = ref.update(g, ref.init(params), params)
    np.testing.assert_allclose(u["w"], r["w"], rtol=1e-6)
    # Adam's first step is sign-like either way; the clip shows in the first moment.
    _, state = clipped.update(g, clipped.init(params), params)
    np.testing.assert_allclose(state.inner[1].mu["w"], 0.1 * np.array([0.6, 0.8]), rtol=1e-5)


def test_adapter_dropout_acts_on_the_pairs_input_only():
    import flax.linen as nn

    model = nn.Dense(D_OUT, use_bias=False, name="proj")
    x = jax.random.normal(jax.random.key(0), (64, D_IN))
    params = model.init(jax.random.key(1), x)["params"]
    pair = Pair(
        jax.random.normal(jax.random.key(2), (D_IN, 2)),
        jax.random.normal(jax.random.key(3), (2, D_OUT)),
    )
    frozen = Frozen(
        jax.random.normal(jax.random.key(4), (D_IN, 3)),
        jax.random.normal(jax.random.key(5), (3, D_OUT)),
    )
    base = x @ params["kernel"]

    def apply(entry, dropout=None):
        with inject.adapters_applied({"": entry}, 0.5, dropout=dropout):
            return model.apply({"params": params}, x)

    key = jax.random.key(9)
    frozen_part = apply((None, frozen)) - base
    out = apply((pair, frozen), (0.5, key))
    # The frozen factors see x unchanged; the pair sees x with half its entries zeroed and the
    # rest doubled (inverted dropout), with the mask drawn from the key.
    keep = jax.random.bernoulli(
        jax.random.fold_in(jax.random.fold_in(key, _crc("")), 1), 0.5, x.shape
    )
    xd = jnp.where(keep, 2 * x, 0)
    expect = base + frozen_part + 0.5 * (xd @ pair.a) @ pair.b
    np.testing.assert_allclose(out, expect, rtol=1e-4, atol=1e-4)
    assert 0.4 < float(keep.mean()) < 0.6
    # Rate 0, or no dropout (evaluation): the plain adapter.
    np.testing.assert_allclose(apply((pair, frozen), (0.0, key)), apply((pair, frozen)), atol=1e-5)


def _crc(path: str) -> int:
    import zlib

    return zlib.crc32(path.encode()) & 0x7FFFFFFF


def test_adapter_dropout_in_the_train_step_keeps_one_compile_and_learns():
    cfg = toy_config(adapter_dropout=0.1, max_steps=60, inner_max_steps=30)
    trainer, state, history = train_toy(cfg, 60)
    assert trainer.compiles == 1
    losses = [s["loss"] for s in history.steps]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
