"""Logical-axis sharding of the native model on a simulated fsdp x tensor mesh."""

import contextlib

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from aroma_jax.core import sharding
from aroma_jax.models.native import NativeCausalLM, NativeConfig, stack_layers
from aroma_jax.models.native.partitioning import (
    activation_rules,
    mesh_axis,
    param_logical_axes,
    sharding_rules,
)

CFG = NativeConfig.from_dict(
    dict(
        model_type="qwen2",  # q/k/v biases too
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
)


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    return sharding.parse_mesh("fsdp=4,tensor=2", jax.devices()[:8])


def test_logical_rules_shard_like_the_path_rules(mesh):
    params = NativeCausalLM(CFG).params
    logical = traverse_util.flatten_dict(
        sharding.param_specs(params, mesh, sharding_rules()), sep="/"
    )
    default = traverse_util.flatten_dict(
        sharding.param_specs(params, mesh, sharding.DEFAULT_RULES), sep="/"
    )
    kernels = [k for k in logical if k.endswith(("kernel", "embedding"))]
    assert len(kernels) == 2 * 7 + 2
    for k in kernels:
        assert logical[k] == default[k], k
    q = "model/layers/0/self_attn/q_proj"
    assert logical[f"{q}/kernel"] == P("fsdp", "tensor")
    assert logical[f"{q}/bias"] == P("tensor")  # biases follow their output axis
    assert logical["model/layers/0/mlp/down_proj/kernel"] == P("tensor", "fsdp")
    with pytest.raises(ValueError, match="accepted"):
        mesh_axis("width")


def test_sharded_forward_with_activation_constraints_matches(mesh):
    model = NativeCausalLM(CFG)
    ids = np.random.default_rng(0).integers(0, 64, (8, 12)).astype(np.int32)
    want = np.asarray(model(ids).logits)
    specs = sharding.param_specs(model.params, mesh, sharding_rules())
    placed = jax.device_put(model.params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))

    def fwd(params, ids):
        return model.module.apply({"params": params}, ids)

    with jax.set_mesh(mesh), nn.logical_axis_rules(activation_rules(mesh)):
        lowered = jax.jit(fwd).lower(placed, ids)
        got = np.asarray(jax.jit(fwd)(placed, ids))
    assert "sharding_constraint" in lowered.as_text()  # the activations are pinned
    assert dict(activation_rules(mesh))["batch"] == ("fsdp",)  # no "data" axis in this mesh
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_scanned_leaves_replicate_the_layer_axis_and_shard_the_rest_as_unrolled(mesh):
    unrolled = NativeCausalLM(CFG)
    L = CFG.num_hidden_layers
    scanned = NativeCausalLM(CFG, stack_layers(unrolled.params, L), scan_layers=True)
    per_layer = traverse_util.flatten_dict(
        sharding.param_specs(unrolled.params, mesh, sharding_rules()), sep="/"
    )
    stacked = traverse_util.flatten_dict(
        sharding.param_specs(scanned.params, mesh, sharding_rules()), sep="/"
    )
    layer_leaves = [k for k in stacked if k.startswith("model/layers/")]
    assert len(layer_leaves) == 9 + 3  # 7 kernels, 2 norms, q/k/v biases
    for k in stacked:
        if k in layer_leaves:
            want = per_layer[k.replace("model/layers/", "model/layers/1/")]
            assert stacked[k] == P(None, *want), k
            names = param_logical_axes(k)
            assert names is not None and names[0] == "layers" and len(names) == 1 + len(want)
        else:
            assert stacked[k] == per_layer[k], k
    assert stacked["model/layers/self_attn/q_proj/kernel"] == P(None, "fsdp", "tensor")
    assert stacked["model/layers/mlp/down_proj/kernel"] == P(None, "tensor", "fsdp")
    assert stacked["model/layers/self_attn/k_proj/bias"] == P(None, "tensor")
    assert param_logical_axes("model/layers/0/self_attn/q_proj/kernel") == ("embed", "heads")
    assert mesh_axis("layers") is None
    # the scanned model runs sharded, its activations pinned inside the scan body
    ids = np.random.default_rng(0).integers(0, 64, (8, 12)).astype(np.int32)
    want = np.asarray(unrolled(ids).logits)
    specs = sharding.param_specs(scanned.params, mesh, sharding_rules())
    placed = jax.device_put(scanned.params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))

    def fwd(params, ids):
        return scanned.module.apply({"params": params}, ids)

    with jax.set_mesh(mesh), nn.logical_axis_rules(activation_rules(mesh)):
        got = np.asarray(jax.jit(fwd)(placed, ids))
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.slow  # three runs and compiles of the AROMA step: ~1 CPU-minute
def test_train_step_under_activation_context_matches_one_device():
    """The AROMA step of the scanned native model on fsdp=8, traced under `activation_context`
    (activations pinned batch-sharded) and without it, gives one device's losses, and the
    pinned program all-reduces less: its contractions over the fsdp-sharded width become weight
    gathers instead of activation-sized partial sums."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    import jax.numpy as jnp

    from aroma_jax import AromaConfig, AromaTrainer
    from aroma_jax.data import objectives
    from aroma_jax.models.hf import PRESETS
    from aroma_jax.models.native.partitioning import activation_context
    from experiments.scale_sim import collectives

    L = CFG.num_hidden_layers
    model = NativeCausalLM(CFG, remat="full", scan_layers=True)
    model.params = stack_layers(NativeCausalLM(CFG).params, L)
    loss_fn, _ = objectives.causal_lm(model)
    cfg = AromaConfig(
        target_modules=PRESETS["llama"],
        r=1,
        alpha=4.0,
        learning_rate=5e-3,
        max_steps=4,
        inner_check_every=2,
        inner_max_steps=3,
        warmup_steps=1,
        rewarmup_steps=1,
    )
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(4):
        ids = rng.integers(0, 64, (8, 12)).astype(np.int32)
        batches.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": ids})
    fsdp = sharding.parse_mesh("fsdp=8", jax.devices()[:8])

    def run(mesh, pinned):
        params = jax.tree.map(jnp.array, model.params)
        trainer = AromaTrainer(loss_fn, params, cfg, stacked={"model/layers": L})
        state = trainer.init(params)
        if mesh is not None:
            state = sharding.shard_trainer(trainer, state, mesh, sharding_rules())
        with activation_context(mesh) if pinned else contextlib.nullcontext():
            hlo = trainer._step.lower(state, batches[0]).compile().as_text()
            losses = []
            for b in batches:
                state, info = trainer.step(state, b)
                losses.append(float(info.loss))
        reduced = collectives(hlo)["every_step"].get("all-reduce", {}).get("bytes", 0)
        return np.array(losses), reduced

    want, _ = run(None, False)
    free, free_reduced = run(fsdp, False)
    pinned, pinned_reduced = run(fsdp, True)
    np.testing.assert_allclose(free, want, rtol=1e-5)
    np.testing.assert_allclose(pinned, want, rtol=1e-5)
    assert pinned_reduced < free_reduced / 2, (pinned_reduced, free_reduced)


def test_step_context_pins_the_llama_family_only(mesh):
    """The runner's step context: the activation rules for a native LLaMA-family model on a
    mesh; nothing without a mesh or for other models (encoders are left out, SHARDING.md)."""
    from aroma_jax.models.native.partitioning import step_context

    model = NativeCausalLM(CFG)
    with step_context(model, mesh):
        assert tuple(nn.get_logical_axis_rules()) == activation_rules(mesh)
        assert not jax.sharding.get_abstract_mesh().empty
    assert tuple(nn.get_logical_axis_rules()) == ()
    for other, where in ((model, None), (object(), mesh)):
        with step_context(other, where):
            assert tuple(nn.get_logical_axis_rules()) == ()
