"""Rank capacity: derived from the run by default; an explicit, binding one warns and never
ends training; filling it is recorded."""

import warnings

import jax.numpy as jnp
import pytest

from aroma_jax import AromaConfig
from aroma_jax.core.config import CapacityWarning, max_outer_steps, shortest_inner_loop
from aroma_jax.examples.toy import toy_config, train_toy


def test_derived_capacity_is_the_most_outer_steps_plus_the_final_merge():
    relora = AromaConfig(target_modules=("x",), method="relora", inner_max_steps=10, max_steps=600)
    assert shortest_inner_loop(relora) == 10 and max_outer_steps(relora) == 60
    assert relora.rank_capacity_derived == 61
    aroma = AromaConfig(target_modules=("x",), inner_check_every=10, max_steps=300)
    # the first check never converges
    assert shortest_inner_loop(aroma) == 20 and aroma.rank_capacity_derived == 16
    short_cap = aroma.replace(inner_max_steps=15)
    assert shortest_inner_loop(short_cap) == 15 and short_cap.rank_capacity_derived == 21
    assert aroma.replace(method="lora").rank_capacity_derived == 1
    assert aroma.replace(rank_capacity=7).rank_capacity_derived == 7


def test_explicit_binding_capacity_warns_and_a_sufficient_one_does_not():
    base = dict(target_modules=("x",), method="relora", inner_max_steps=10, max_steps=600)
    with pytest.warns(CapacityWarning, match="rank_capacity=32 can bind.*up to 60 outer steps"):
        AromaConfig(**base, rank_capacity=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AromaConfig(**base, rank_capacity=61)
        AromaConfig(**base)


def test_relora_trains_to_max_steps_with_the_default_capacity():
    # The defect: with 32 fixed slots this run used to stop at step 320 with every module done.
    cfg = toy_config(method="relora", inner_max_steps=10, max_steps=600, warmup_steps=5)
    trainer, state, history = train_toy(cfg, 600)
    assert int(state.ctrl.step) == 600
    assert len(history.outer_step_numbers()) == 60
    assert history.full_modules() == []
    # m0 (planted rank 0) never moves, and a zero pair is never merged
    assert trainer.ranks(state) == {"m0": 0, "m1": 60, "m3": 60}


def test_a_binding_capacity_stops_growth_not_training_and_is_recorded():
    with pytest.warns(CapacityWarning):
        cfg = toy_config(
            method="relora", inner_max_steps=10, max_steps=100, warmup_steps=5, rank_capacity=4
        )
    trainer, state, history = train_toy(cfg, 100)
    assert int(state.ctrl.step) == 100  # training went on to max_steps
    # the last slot is kept free; m0's pair never moves (planted rank 0, zero gradient), and no
    # method merges a zero pair, so it is never full either
    assert trainer.ranks(state) == {"m0": 0, "m1": 3, "m3": 3}
    assert history.full_modules() == ["m1", "m3"]
    assert not any(bool(d) for d in state.adapters.done.values())
    pair_b = state.adapters.pairs["m1"].b
    assert float(jnp.abs(pair_b).max()) > 0  # the full module's pair kept training
    final = trainer.finalize(state)
    # finalize merged the trained pairs into the last slot (ReLoRA: no eq. 6); m0's stayed zero
    assert trainer.ranks(final) == {"m0": 0, "m1": 4, "m3": 4}


def test_head_only_method_trains_no_adapter_and_runs_to_max_steps():
    cfg = toy_config(method="head", max_steps=30)
    trainer, state, history = train_toy(cfg, 30)
    assert int(state.ctrl.step) == 30 and history.outer_step_numbers() == []
    assert all(float(jnp.abs(p.b).max()) == 0.0 for p in state.adapters.pairs.values())
    assert set(trainer.ranks(trainer.finalize(state)).values()) == {0}
