"""The native model with its layers under ``nn.scan`` (``scan_layers=True``).

The scanned model must compute what the unrolled one computes on the same weights (stacked with
`stack_layers`), trace one layer once, load safetensors checkpoints straight into the stacked
layout, write per-layer names back, and slice extra leaves in a Dense scope (adapter factors)
per layer with their gradients stacked.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding

from aroma_jax.core import sharding
from aroma_jax.models.native import (
    CausalLM,
    NativeCausalLM,
    NativeConfig,
    checkpoint_io,
    is_scanned,
    stack_layers,
    unstack_layers,
)
from aroma_jax.models.native.partitioning import sharding_rules

BASE = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=64,
)
CASES = {
    "llama_mha_untied": dict(model_type="llama", num_key_value_heads=4),
    "llama_gqa_tied": dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=True),
    "llama_biases": dict(
        model_type="llama", num_key_value_heads=2, attention_bias=True, mlp_bias=True
    ),
    "qwen2_bias_untied": dict(model_type="qwen2", num_key_value_heads=2),
    "qwen2_bias_tied_one_kv": dict(
        model_type="qwen2", num_key_value_heads=1, tie_word_embeddings=True
    ),
    "mistral_window": dict(model_type="mistral", num_key_value_heads=2, sliding_window=4),
}


def config(case: str, **kw) -> NativeConfig:
    return NativeConfig.from_dict({**BASE, **CASES[case], **kw})


def randomized(params, seed: int = 1):
    """Random biases and norm weights too, so a layer or leaf mix-up cannot hide."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    out = {}
    for k, v in flat.items():
        v = np.asarray(v, np.float32)
        if k.endswith("bias") or k.endswith("norm/weight"):
            v = v + rng.normal(0.0, 0.5, v.shape).astype(np.float32)
        out[k] = v
    return traverse_util.unflatten_dict(out, sep="/")


def unrolled_model(case: str, **kw) -> NativeCausalLM:
    model = NativeCausalLM(config(case, **kw), seed=0)
    model.params = randomized(model.params)
    return model


def tokens(batch: int = 2, seq: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 64, (batch, seq)).astype(np.int32)


def flat(tree) -> dict:
    return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def logits(model: NativeCausalLM, x, mask=None) -> np.ndarray:
    """Compiled once (the eager op-by-op forward is slow on two cores)."""
    fwd = jax.jit(lambda p, x, m: model.module.apply({"params": p}, x, m))
    return np.asarray(
        fwd(model.params, jnp.asarray(x), None if mask is None else jnp.asarray(mask))
    )


# ---------------------------------------------------------------------------- forward, remat
@pytest.mark.parametrize("case", list(CASES))
def test_scanned_logits_equal_unrolled(case):
    ref = unrolled_model(case)
    L = ref.config.num_hidden_layers
    scanned = NativeCausalLM(ref.config, stack_layers(ref.params, L), scan_layers=True)
    p = scanned.params["model"]["layers"]
    assert p["self_attn"]["q_proj"]["kernel"].shape == (L, 32, 32)
    assert p["mlp"]["down_proj"]["kernel"].shape == (L, 64, 32)
    assert p["input_layernorm"]["weight"].shape == (L, 32)
    assert ("bias" in p["self_attn"]["q_proj"]) == ref.config.qkv_bias
    assert ("lm_head" in scanned.params) != ref.config.tie_word_embeddings
    x = tokens()
    mask = np.ones_like(x)
    mask[0, :3] = 0  # left padding: the mask is broadcast into every layer
    want = logits(ref, x, mask)
    got = logits(scanned, x, mask)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scanned_loss_and_grads_equal_unrolled_under_remat(remat):
    ref = unrolled_model("qwen2_bias_untied", num_hidden_layers=2)
    L = 2
    unrolled = NativeCausalLM(ref.config, ref.params, remat=remat)
    scanned = NativeCausalLM(ref.config, stack_layers(ref.params, L), remat=remat, scan_layers=True)
    x = tokens()

    def loss(model):
        def f(params):
            out = model.module.apply({"params": params}, jnp.asarray(x))
            return jnp.mean(jax.nn.logsumexp(out, -1) - out[..., 0])

        return jax.jit(jax.value_and_grad(f))

    lu, gu = loss(unrolled)(unrolled.params)
    ls, gs = loss(scanned)(scanned.params)
    np.testing.assert_allclose(float(ls), float(lu), atol=1e-5)
    want, got = flat(stack_layers(jax.device_get(gu), L)), flat(gs)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5, err_msg=k)


# ---------------------------------------------------------------------------- adapter contract
def adapter_interceptor(next_fun, args, kwargs, context):
    """Adds ``x @ aroma_a @ aroma_b`` to a Dense call whose scope holds those leaves."""
    out = next_fun(*args, **kwargs)
    if context.method_name != "__call__" or not isinstance(context.module, nn.Dense):
        return out
    own = context.module.variables.get("params", {})
    if "aroma_a" not in own:
        return out
    return out + args[0] @ own["aroma_a"] @ own["aroma_b"]


@pytest.mark.parametrize("remat", ["none", "full"])
def test_extra_leaves_in_a_dense_scope_are_sliced_per_layer_with_stacked_grads(remat):
    ref = unrolled_model("qwen2_bias_untied")
    L, r = ref.config.num_hidden_layers, 2
    rng = np.random.default_rng(3)
    params = jax.device_get(ref.params)
    for i in range(L):  # a different adapter per layer on q_proj and down_proj
        for mod, (din, dout) in (("self_attn/q_proj", (32, 32)), ("mlp/down_proj", (64, 32))):
            scope = params["model"]["layers"][str(i)]
            for part in mod.split("/"):
                scope = scope[part]
            scope["aroma_a"] = rng.normal(0, 0.3, (din, r)).astype(np.float32)
            scope["aroma_b"] = rng.normal(0, 0.3, (r, dout)).astype(np.float32)
    stacked = stack_layers(params, L)
    assert stacked["model"]["layers"]["self_attn"]["q_proj"]["aroma_a"].shape == (L, 32, r)
    unrolled = NativeCausalLM(ref.config, params)
    scanned = NativeCausalLM(ref.config, stacked, scan_layers=True, remat=remat)
    x = jnp.asarray(tokens())
    seen = []

    def spy(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and "aroma_a" in context.module.variables.get(
            "params", {}
        ):
            seen.append(context.module.variables["params"]["aroma_a"].shape)
        return adapter_interceptor(next_fun, args, kwargs, context)

    def run(model):
        def f(p):
            with nn.intercept_methods(spy):
                out = model.module.apply({"params": p}, x)
            return jnp.sum(out**2) / out.size, out

        return jax.jit(jax.value_and_grad(f, has_aux=True))(model.params)

    (lu, want), gu = run(unrolled)
    seen.clear()
    (ls, got), gs = run(scanned)
    assert seen and set(seen) == {(32, r), (64, r)}  # one layer's slice inside the Dense
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    # the adapters change the output: the test would fail if the scan dropped them
    assert np.abs(np.asarray(want) - logits(ref, x)).max() > 1e-3
    np.testing.assert_allclose(float(ls), float(lu), atol=1e-5)
    ga = gs["model"]["layers"]["self_attn"]["q_proj"]["aroma_a"]
    assert ga.shape == (L, 32, r)
    want_g, got_g = flat(stack_layers(jax.device_get(gu), L)), flat(gs)
    assert want_g.keys() == got_g.keys()
    for k in want_g:
        np.testing.assert_allclose(got_g[k], want_g[k], atol=1e-5, err_msg=k)
    assert np.abs(np.asarray(ga)).max() > 0


# ---------------------------------------------------------------------------- layout helpers
def test_stack_unstack_round_trip_numpy_and_jax():
    ref = unrolled_model("llama_gqa_tied")
    params = jax.device_get(ref.params)
    L = ref.config.num_hidden_layers
    stacked = stack_layers(params, L)
    assert is_scanned(stacked) and not is_scanned(params)
    assert stacked["model"]["embed_tokens"] is params["model"]["embed_tokens"]  # shared
    k = "model/layers/mlp/up_proj/kernel"
    np.testing.assert_array_equal(
        flat(stacked)[k],
        np.stack([params["model"]["layers"][str(i)]["mlp"]["up_proj"]["kernel"] for i in range(L)]),
    )
    assert isinstance(flat(stacked)[k], np.ndarray)
    back = unstack_layers(stacked)
    assert flat(back).keys() == flat(params).keys()
    for key, v in flat(params).items():
        np.testing.assert_array_equal(flat(back)[key], v)
    on_device = stack_layers(jax.tree.map(jnp.asarray, params), L)  # jax arrays stay jax
    assert isinstance(on_device["model"]["layers"]["mlp"]["up_proj"]["kernel"], jax.Array)
    with pytest.raises(ValueError, match="expected layers"):
        stack_layers(params, L + 1)
    with pytest.raises(ValueError, match="no stacked layers"):
        unstack_layers(params)
    with pytest.raises(ValueError, match="scan_layers=True"):
        NativeCausalLM(ref.config, stacked)


def test_scanned_init_has_the_stacked_layout():
    cfg = config("qwen2_bias_untied")
    scanned = NativeCausalLM(cfg, seed=0, scan_layers=True)
    unrolled = NativeCausalLM(cfg, seed=0)
    want = {k: (cfg.num_hidden_layers, *v.shape) for k, v in flat(unrolled.params).items()}
    got = {k: v.shape for k, v in flat(unstack_layers(scanned.params)).items()}
    assert got == {k: want[k][1:] for k in want}
    for i in range(cfg.num_hidden_layers - 1):  # split RNGs: each layer initialised apart
        q = scanned.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
        assert not np.allclose(q[i], q[i + 1])


# ---------------------------------------------------------------------------- one layer traced
def count(jaxpr, name: str) -> int:
    """Equations named ``name`` in ``jaxpr`` and every jaxpr nested in its equations."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else (v,):
                if hasattr(sub, "eqns"):
                    n += count(sub, name)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    n += count(sub.jaxpr, name)
    return n


def forward_jaxpr(num_layers: int, scan: bool):
    """The forward's jaxpr, traced on abstract params (no init compiled)."""
    module = CausalLM(config("llama_gqa_tied", num_hidden_layers=num_layers), scan_layers=scan)
    x = jnp.asarray(tokens())
    params = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    return jax.make_jaxpr(lambda p, x: module.apply({"params": p}, x))(params, x).jaxpr


def test_a_scanned_model_traces_one_layer():
    four = forward_jaxpr(4, scan=True)
    assert count(four, "scan") == 1
    two, six = (
        count(forward_jaxpr(2, True), "dot_general"),
        count(forward_jaxpr(6, True), "dot_general"),
    )
    assert two == six == count(four, "dot_general")
    assert count(forward_jaxpr(6, scan=False), "dot_general") > count(
        forward_jaxpr(2, scan=False), "dot_general"
    )


# ---------------------------------------------------------------------------- checkpoints
def save_sharded(params, out, dtype, n_files: int = 3) -> None:
    """A sharded ``model.safetensors.index.json`` checkpoint in ``dtype`` (torch-free)."""
    leaves = sorted(flat(params).items())
    weight_map = {}
    for j in range(n_files):
        part = {k: np.asarray(v).astype(dtype) for k, v in leaves[j::n_files]}
        fname = f"model-{j + 1:05d}-of-{n_files:05d}.safetensors"
        checkpoint_io.save_safetensors(traverse_util.unflatten_dict(part, sep="/"), out / fname)
        for name in checkpoint_io.SafetensorsFile(out / fname).keys():
            weight_map[name] = fname
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_saved_checkpoint_loads_into_the_scanned_layout(tmp_path):
    ref = unrolled_model("qwen2_bias_untied")
    ref.save_pretrained(tmp_path)
    loaded = NativeCausalLM.from_pretrained(tmp_path, scan_layers=True)
    assert loaded.scan_layers and is_scanned(loaded.params)
    L = ref.config.num_hidden_layers
    want = flat(stack_layers(jax.device_get(ref.params), L))
    got = flat(loaded.params)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    x = tokens()
    np.testing.assert_allclose(logits(loaded, x), logits(ref, x), atol=1e-5, rtol=0)
    # the scanned tree is written back under per-layer HF names, byte for byte
    loaded.save_pretrained(tmp_path / "again")
    a = checkpoint_io.SafetensorsFile(tmp_path / "model.safetensors")
    b = checkpoint_io.SafetensorsFile(tmp_path / "again" / "model.safetensors")
    assert sorted(a.keys()) == sorted(b.keys())
    assert f"model.layers.{L - 1}.self_attn.q_proj.bias" in b.keys()
    for name in a.keys():
        np.testing.assert_array_equal(b.get(name), a.get(name), err_msg=name)


def test_sharded_bf16_checkpoint_loads_scanned_with_casting_and_shardings(tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    ref = unrolled_model("llama_gqa_tied")
    ref.save_pretrained(tmp_path)  # config.json
    (tmp_path / "model.safetensors").unlink()
    save_sharded(ref.params, tmp_path, ml_dtypes.bfloat16)
    L = ref.config.num_hidden_layers
    want = flat(stack_layers(jax.device_get(NativeCausalLM.from_pretrained(tmp_path).params), L))
    mesh = sharding.parse_mesh("fsdp=4,tensor=2", jax.devices()[:8])
    specs = flat(sharding.param_specs(unflat_like(want), mesh, sharding_rules()))
    seen = {}

    def sharding_for(path, shape):
        seen[path] = shape
        return NamedSharding(mesh, specs[path])

    model = NativeCausalLM.from_pretrained(tmp_path, sharding_for=sharding_for, scan_layers=True)
    assert seen["model/layers/self_attn/q_proj/kernel"] == (L, 32, 32)
    assert len(seen) == 9 + 2  # 9 stacked layer leaves, the embedding and the final norm
    got = model.params
    q = got["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert (
        q.dtype == np.float32 and q.sharding.spec == specs["model/layers/self_attn/q_proj/kernel"]
    )
    assert q.sharding.spec[0] is None and q.sharding.spec[1:] == ("fsdp", "tensor")
    for k, v in flat(got).items():
        np.testing.assert_array_equal(v, want[k], err_msg=k)
    bf16 = NativeCausalLM.from_pretrained(tmp_path, param_dtype="bfloat16", scan_layers=True)
    assert bf16.params["model"]["layers"]["mlp"]["up_proj"]["kernel"].dtype.name == "bfloat16"


def unflat_like(flat_tree: dict) -> dict:
    return traverse_util.unflatten_dict(flat_tree, sep="/")


def test_generate_on_the_scanned_model_matches_unrolled():
    ref = unrolled_model("llama_gqa_tied")
    scanned = NativeCausalLM(
        ref.config, stack_layers(ref.params, ref.config.num_hidden_layers), scan_layers=True
    )
    prompt = tokens(seq=5)
    kw = dict(max_new_tokens=3, eos_token_id=-1)
    np.testing.assert_array_equal(
        np.asarray(scanned.generate(prompt, **kw).sequences),
        np.asarray(ref.generate(prompt, **kw).sequences),
    )
