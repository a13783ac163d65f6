import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aroma_jax import AromaConfig, ConfigError, adapters, inject
from aroma_jax.adapters import Frozen, Pair


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16, name="up")(x)
        h = nn.DenseGeneral((2, 4), name="heads")(jax.nn.relu(h))  # kernel (16, 2, 4)
        h = h.reshape(h.shape[:-2] + (8,))
        return nn.Dense(3, name="down")(h)


def setup():
    model = MLP()
    params = model.init(jax.random.key(0), jnp.ones((2, 5, 6)))["params"]
    return model, params


def test_find_targets_and_unknown_pattern_lists_paths():
    _, params = setup()
    specs = adapters.find_targets(params, ("up", "heads"))
    assert sorted(specs) == ["heads", "up"]
    assert specs["heads"].fan_in == 16 and specs["heads"].fan_out == 8
    with pytest.raises(ConfigError) as err:
        adapters.find_targets(params, ("query",))
    msg = str(err.value)
    assert "'query'" in msg and "up" in msg and "down" in msg and "heads" in msg


def test_suffix_and_regex_matching():
    assert adapters.matches("attention/output/dense", "bert/layer/0/attention/output/dense")
    assert not adapters.matches("output/dense", "bert/layer/0/intermediate/dense")
    assert not adapters.matches("dense", "bert/layer/0/intermediate/dense_1")
    assert adapters.matches(r".*layer/\d+/query", "bert/layer/11/query")


def test_init_pair_kaiming_and_zero_b():
    _, params = setup()
    cfg = AromaConfig(target_modules=("up", "down"), r=2, rank_capacity=5)
    specs = adapters.find_targets(params, cfg.target_modules)
    st = adapters.init(specs, cfg, jax.random.key(1))
    assert st.pairs["up"].a.shape == (6, 2) and st.pairs["up"].b.shape == (2, 16)
    assert float(jnp.abs(st.pairs["up"].b).max()) == 0.0
    assert float(jnp.abs(st.pairs["up"].a).max()) <= 1 / np.sqrt(6)
    assert st.frozen["down"].a.shape == (8, 10) and st.frozen["down"].b.shape == (10, 3)
    assert adapters.ranks(st, cfg) == {"down": 0, "up": 0}


def dense_reference(model, params, x, deltas):
    """The same model with dense kernels W0 + dW (reference implementation)."""
    p = jax.tree.map(lambda v: v, params)
    for path, dw in deltas.items():
        k = p[path]["kernel"]
        p[path] = dict(p[path], kernel=k + dw.reshape(k.shape))
    return model.apply({"params": p}, x)


@pytest.mark.parametrize("r", [1, 3])
def test_injected_output_equals_dense_reference(r):
    model, params = setup()
    x = jax.random.normal(jax.random.key(2), (2, 5, 6))
    rng = np.random.default_rng(0)
    mods, deltas = {}, {}
    s = 1.7
    for path, (fin, fout) in {"up": (6, 16), "heads": (16, 8)}.items():
        a, b = rng.normal(size=(fin, r)), rng.normal(size=(r, fout))
        fa, fb = rng.normal(size=(fin, 4)), rng.normal(size=(4, fout))
        pair = Pair(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
        frozen = Frozen(jnp.asarray(fa, jnp.float32), jnp.asarray(fb, jnp.float32))
        mods[path] = (pair, frozen)
        deltas[path] = jnp.asarray(s * (a @ b + fa @ fb), jnp.float32)
    with inject.adapters_applied(mods, s) as hits:
        got = model.apply({"params": params}, x)
    assert hits == {"up", "heads"}
    want = dense_reference(model, params, x, deltas)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_rank_one_custom_vjp_matches_autodiff():
    x = jax.random.normal(jax.random.key(3), (4, 7, 6))
    a = jax.random.normal(jax.random.key(4), (6, 1))
    b = jax.random.normal(jax.random.key(5), (1, 5))
    g = jax.random.normal(jax.random.key(6), (4, 7, 5))

    def fast(x, a, b):
        return jnp.sum(inject.lowrank_delta(x, a, b, 0.5) * g)

    def ref(x, a, b):
        return jnp.sum(0.5 * (x @ a) @ b * g)

    np.testing.assert_allclose(fast(x, a, b), ref(x, a, b), rtol=1e-5)
    grads = zip(jax.grad(fast, (0, 1, 2))(x, a, b), jax.grad(ref, (0, 1, 2))(x, a, b), strict=True)
    for got, want in grads:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_modules_without_adapter_untouched():
    model, params = setup()
    x = jnp.ones((1, 5, 6))
    with inject.adapters_applied({}, 1.0) as hits:
        y = model.apply({"params": params}, x)
    assert hits == set()
    np.testing.assert_array_equal(y, model.apply({"params": params}, x))
