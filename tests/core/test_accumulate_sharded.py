"""Gradient accumulation on an 8-device mesh (data=2, fsdp=4) equals one device without it.

A tiny LLaMA with the causal-LM objective on padded batches (target tokens of unequal length,
weighted by `objectives.causal_lm_tokens`): k = 4 micro-batches of 8 rows on the mesh against
k = 1 with the whole batch of 32 on one device, for AROMA and LoRA. The strided micro-batch
split keeps every micro-batch on all data shards: the compiled step has no all-to-all.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from aroma_jax import AromaConfig, AromaTrainer
from aroma_jax.core import accumulate, sharding
from aroma_jax.data import objectives
from aroma_jax.models.hf import PRESETS

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

MESH = "data=2,fsdp=4"
ROWS, LENGTH, VOCAB, STEPS = 32, 12, 96, 12


def tiny_llama():
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return transformers.FlaxLlamaForCausalLM(cfg, seed=0)


def lm_batch(i):
    """Prompts and targets of unequal length: the loss mask covers 1 to 8 target tokens."""
    rng = np.random.default_rng(i)
    ids = rng.integers(3, VOCAB, (ROWS, LENGTH)).astype(np.int32)
    start = rng.integers(2, LENGTH - 1, ROWS)
    end = np.minimum(start + rng.integers(1, 9, ROWS), LENGTH)
    pos = np.arange(LENGTH)[None, :]
    return {
        "input_ids": ids,
        "attention_mask": (pos < end[:, None]).astype(np.int32),
        "loss_mask": ((pos >= start[:, None]) & (pos < end[:, None])).astype(np.int32),
    }


def run(method, k, mesh_spec):
    model = tiny_llama()
    loss_fn, _ = objectives.causal_lm(model)
    extra = (
        dict(inner_check_every=2, inner_max_steps=4, outer_tol=1e-3) if method == "aroma" else {}
    )
    cfg = AromaConfig(
        target_modules=PRESETS["llama"],
        method=method,
        r=1 if method == "aroma" else 2,
        alpha=4.0,
        learning_rate=5e-3,
        max_steps=STEPS,
        warmup_steps=2,
        rewarmup_steps=2,
        **extra,
    )
    params = jax.tree.map(jnp.array, model.params)
    trainer = AromaTrainer(
        loss_fn, params, cfg, grad_accum=k, loss_weight=objectives.causal_lm_tokens
    )
    state = trainer.init(params)
    if mesh_spec:
        state = sharding.shard_trainer(trainer, state, sharding.parse_mesh(mesh_spec))
    infos = []
    for i in range(STEPS):
        state, info = trainer.step(state, lm_batch(i))
        infos.append(jax.device_get(info))
    return trainer, state, infos


@pytest.mark.slow  # two runs of 12 steps and an 8-device compile: about a minute of CPU
@pytest.mark.parametrize("method", ["aroma", "lora"])
def test_k4_on_a_mesh_is_the_one_device_run_of_the_whole_batch(method):
    t4, s4, i4 = run(method, 4, MESH)
    t1, s1, i1 = run(method, 1, None)
    losses4 = np.array([float(i.loss) for i in i4])
    losses1 = np.array([float(i.loss) for i in i1])
    rel = float(np.max(np.abs(losses4 - losses1) / np.abs(losses1)))
    print(f"{method} {MESH} k=4 vs one device k=1: max relative loss difference {rel:.2e}")
    np.testing.assert_allclose(losses4, losses1, rtol=1e-5)
    for f in ("step", "checked", "outer", "merged", "newly_done", "ranks", "by_cap"):
        for a, b in zip(i4, i1, strict=True):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    if method == "aroma":
        assert sum(bool(i.outer) for i in i1) >= 2
    assert t4.ranks(s4) == t1.ranks(s1)
    assert int(s4.opt_state.count) == int(s1.opt_state.count) == STEPS
    assert t4.compiles == 1


def collectives(trainer, state):
    hlo = trainer._step.lower(state, lm_batch(0)).compile().as_text()
    kinds = ("all-to-all", "all-gather", "collective-permute", "all-reduce")
    return {kind: hlo.count(f" {kind}(") for kind in kinds}


def mesh_trainer(k):
    model = tiny_llama()
    loss_fn, _ = objectives.causal_lm(model)
    cfg = AromaConfig(target_modules=PRESETS["llama"], max_steps=4, warmup_steps=0)
    params = jax.tree.map(jnp.array, model.params)
    trainer = AromaTrainer(
        loss_fn, params, cfg, grad_accum=k, loss_weight=objectives.causal_lm_tokens
    )
    return trainer, sharding.shard_trainer(trainer, trainer.init(params), sharding.parse_mesh(MESH))


@pytest.fixture(scope="module")
def without_accumulation():
    return collectives(*mesh_trainer(1))


@pytest.mark.slow  # two 8-device compiles (make test is over its time budget)
def test_micro_batches_stay_on_every_data_shard(without_accumulation):
    """The k = 4 step moves data between devices as the k = 1 step does (the model's own
    collectives, on micro-batch-sized arrays), plus one all-reduce (the batch's token count):
    each device splits its own rows (the strided split). A batch whose shards do not each
    divide into k micro-batches is refused with a one-line error."""
    trainer, state = mesh_trainer(4)
    ops = collectives(trainer, state)
    print(f"collectives per step, k=1: {without_accumulation}; k=4: {ops}")
    assert ops["collective-permute"] == without_accumulation["collective-permute"] == 0
    for kind in ("all-to-all", "all-gather"):
        assert ops[kind] == without_accumulation[kind]
    assert ops["all-reduce"] <= without_accumulation["all-reduce"] + 1
    small = {k: v[:16] for k, v in lm_batch(0).items()}  # 2 rows per shard, not 4
    with pytest.raises(ValueError, match=r"each of the 8 batch shards holds 2 rows.*\(32\)"):
        trainer.step(state, small)


@pytest.mark.slow
def test_a_contiguous_split_would_move_micro_batches_between_devices(
    without_accumulation, monkeypatch
):
    """The control for the test above: micro-batch j as rows j*B/k ... lives on a quarter of
    the shards, and XLA reshards every micro-batch (collective-permutes, extra all-reduces)."""

    def contiguous(batch, k, shards=1):
        rows = accumulate.batch_rows(batch)
        return jax.tree.map(lambda x: x.reshape((k, rows // k) + x.shape[1:]), batch)

    monkeypatch.setattr(accumulate, "split", contiguous)
    ops = collectives(*mesh_trainer(4))
    print(f"collectives per step, k=1: {without_accumulation}; contiguous k=4: {ops}")
    assert ops["collective-permute"] > 0
    assert ops["all-reduce"] > without_accumulation["all-reduce"] + 1
