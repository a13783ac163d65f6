"""Layer-stacked adapters (a model whose layers run under ``nn.scan``) against the same model
unrolled: the controller's per-(module, layer) decisions, the losses and the final adapters
must be the same run."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aroma_jax import AromaConfig, AromaTrainer
from aroma_jax.core import adapters as adapters_lib
from aroma_jax.core import inject
from aroma_jax.core.config import ConfigError

L, D = 3, 8


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.Dense(D, name="up")(x)
        return x + nn.Dense(D, name="down")(jnp.tanh(h)), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)(
            name="layers"
        )
        x, _ = stack(x, None)
        return nn.Dense(2, name="head")(x)


class Unrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(L):
            x, _ = Block(name=f"layers_{i}")(x, None)
        return nn.Dense(2, name="head")(x)


def _unrolled_params(stacked):
    p = jax.tree.map(lambda x: x, stacked)
    layers = p.pop("layers")
    for i in range(L):
        p[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], layers)
    return p


def _data():
    x = jax.random.normal(jax.random.key(3), (16, D))
    y = jnp.stack([jnp.sin(x[:, 0] * 2), jnp.cos(x[:, 1] + x[:, 2])], -1)
    return {"x": x, "y": y}


def _trainer(model, params, cfg, stacked=None):
    def loss_fn(p, batch, rng):
        return jnp.mean((model.apply({"params": p}, batch["x"]) - batch["y"]) ** 2)

    return AromaTrainer(loss_fn, params, cfg, donate=False, stacked=stacked)


@pytest.fixture(scope="module")
def params():
    return Scanned().init(jax.random.key(0), jnp.ones((1, D)))["params"]


def _cfg(**kw):
    base = dict(
        target_modules=("up",),
        max_steps=60,
        warmup_steps=0,
        learning_rate=0.05,
        inner_check_every=5,
        inner_max_steps=20,
        inner_tol=0.05,
        outer_tol=0.02,
        reset="full",
        train_patterns=("head",),
    )
    base.update(kw)
    return AromaConfig(**base)


def _entries_unrolled(name: str) -> str:  # layers_1/up -> layers/1/up
    head, _, rest = name.partition("/")
    return f"layers/{head.split('_')[1]}/{rest}"


@pytest.mark.parametrize("bias_correction", ["shared", "per_module"])
def test_stacked_run_equals_the_unrolled_run(params, bias_correction):
    cfg = _cfg(bias_correction=bias_correction)
    st = _trainer(Scanned(), params, cfg, stacked={"layers": L})
    un = _trainer(Unrolled(), _unrolled_params(params), cfg)
    assert st.module_paths == ("layers/up",)
    assert st.paths == ("layers/0/up", "layers/1/up", "layers/2/up")
    assert tuple(_entries_unrolled(p) for p in un.paths) == st.paths
    s_state, u_state = st.init(params), un.init(_unrolled_params(params))
    assert s_state.adapters.pairs["layers/up"].a.shape == (L, D, 1)
    batch = _data()
    outer_steps = 0
    for _ in range(cfg.max_steps):
        s_state, si = st.step(s_state, batch)
        u_state, ui = un.step(u_state, batch)
        np.testing.assert_allclose(si.loss, ui.loss, rtol=1e-5, atol=1e-6)
        for field in ("checked", "outer", "by_cap", "finished"):
            assert bool(getattr(si, field)) == bool(getattr(ui, field)), field
        for field in ("merged", "newly_done", "ranks", "converged", "full"):
            np.testing.assert_array_equal(getattr(si, field), getattr(ui, field), err_msg=field)
        np.testing.assert_allclose(si.rho_in, ui.rho_in, rtol=1e-4, equal_nan=True)
        np.testing.assert_allclose(si.rho_out, ui.rho_out, rtol=1e-4, equal_nan=True)
        outer_steps += int(si.outer)
    assert outer_steps >= 2  # the comparison covered merges, resets and re-inits
    assert st.compiles == 1
    s_fin, u_fin = st.finalize(s_state), un.finalize(u_state)
    ranks = st.ranks(s_fin)
    assert ranks == {_entries_unrolled(p): r for p, r in un.ranks(u_fin).items()}
    assert max(ranks.values()) >= 2
    flat = st.unstacked(s_fin.adapters)
    for p in un.paths:
        e = _entries_unrolled(p)
        np.testing.assert_allclose(
            flat.frozen[e].a @ flat.frozen[e].b,
            u_fin.adapters.frozen[p].a @ u_fin.adapters.frozen[p].b,
            rtol=1e-4,
            atol=1e-6,
        )
    # The folded fp32 kernels hold the same update, layer by layer.
    k_s = s_fin.base["layers"]["up"]["kernel"]
    for i in range(L):
        np.testing.assert_allclose(
            k_s[i], u_fin.base[f"layers_{i}"]["up"]["kernel"], rtol=1e-5, atol=1e-6
        )
    back = st.restacked(flat)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(s_fin.adapters), strict=True):
        np.testing.assert_array_equal(x, y)


def test_stacked_adapters_reach_each_layer_with_unfolded_factors(params):
    """bf16-like path: the frozen factors are applied (not folded) from the params leaves."""
    cfg = _cfg(fold="never", max_steps=30)
    st = _trainer(Scanned(), params, cfg, stacked={"layers": L})
    un = _trainer(Unrolled(), _unrolled_params(params), cfg)
    s_state, u_state = st.init(params), un.init(_unrolled_params(params))
    batch = _data()
    for _ in range(cfg.max_steps):
        s_state, si = st.step(s_state, batch)
        u_state, ui = un.step(u_state, batch)
    np.testing.assert_allclose(si.loss, ui.loss, rtol=1e-5)
    assert int(si.ranks.sum()) > 0
    with st.applied(s_state) as p:
        y_s = Scanned().apply({"params": p}, batch["x"])
    with un.applied(u_state) as p:
        y_u = Unrolled().apply({"params": p}, batch["x"])
    np.testing.assert_allclose(y_s, y_u, rtol=1e-5, atol=1e-6)


def test_dropout_masks_differ_per_layer(params):
    cfg = _cfg(adapter_dropout=0.5, max_steps=2)
    st = _trainer(Scanned(), params, cfg, stacked={"layers": L})
    state = st.init(params)
    modules = st.modules(state.adapters, training=True)
    p = st.with_stacked(dict(params), modules, jax.random.key(1))
    keys = p["layers"]["up"][inject.DROP_KEY]
    assert keys.shape[0] == L and len({tuple(np.asarray(k).ravel()) for k in keys}) == L
    state, info = st.step(state, _data())
    assert np.isfinite(float(info.loss))


def test_a_scanned_stack_is_targeted_whole_or_not_at_all(params):
    with pytest.raises(ConfigError, match="all of its layers or none"):
        _trainer(Scanned(), params, _cfg(target_modules=("layers/1/up",)), {"layers": L})
    specs = adapters_lib.find_targets(params, ("up",), stacked={"layers": L})
    assert specs["layers/up"].stack == L and specs["layers/up"].kernel_shape == (D, D)
    assert adapters_lib.entry_names(specs) == ("layers/0/up", "layers/1/up", "layers/2/up")
    with pytest.raises(ConfigError, match="does not support scanned layers"):
        _trainer(Scanned(), params, _cfg(method="dora"), {"layers": L})


def test_stacked_state_shards_with_the_layer_axis_replicated(params):
    from jax.sharding import PartitionSpec as P

    from aroma_jax.core import sharding

    cfg = _cfg(max_steps=25, reset="prune")
    batch = _data()
    runs = []
    for mesh_spec in (None, "data=2,fsdp=4"):
        st = _trainer(Scanned(), params, cfg, stacked={"layers": L})
        state = st.init(params)
        if mesh_spec:
            mesh = sharding.parse_mesh(mesh_spec)
            specs = sharding.state_shardings(st, state, mesh)
            assert specs.base["layers"]["up"]["kernel"].spec == P(None, "fsdp", None)
            assert specs.adapters.pairs["layers/up"].a.spec == P(None, "fsdp", None)
            assert specs.adapters.frozen["layers/up"].b.spec == P(None, None, None)
            state = sharding.shard_trainer(st, state, mesh)
        losses, ranks = [], []
        for _ in range(cfg.max_steps):
            state, info = st.step(state, batch)
            losses.append(float(info.loss))
            ranks.append(np.asarray(info.ranks).tolist())
        runs.append((np.asarray(losses), ranks, st.compiles))
    (l1, r1, _), (l2, r2, c2) = runs
    assert r1 == r2 and max(r1[-1]) >= 1 and c2 == 1
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
