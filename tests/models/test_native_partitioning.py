"""Logical-axis sharding of the native model on a simulated fsdp x tensor mesh."""

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
