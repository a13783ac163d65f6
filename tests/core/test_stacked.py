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


@pytest.mark.parametrize(
    "reset,bias_correction",
    [("prune", "shared"), ("full", "per_module"), ("none", "shared")],
)
def test_stacked_run_equals_the_unrolled_run(params, reset, bias_correction):
    """Two modules per layer, every reset mode: each (module, layer) draws its fresh pairs and
    prune masks from its own key, so the scanned and the unrolled run decide alike."""
    cfg = _cfg(bias_correction=bias_correction, reset=reset, target_modules=("up", "down"))
    st = _trainer(Scanned(), params, cfg, stacked={"layers": L})
    un = _trainer(Unrolled(), _unrolled_params(params), cfg)
    assert st.module_paths == ("layers/down", "layers/up")
    assert st.paths[3:] == ("layers/0/up", "layers/1/up", "layers/2/up")
    assert sorted(_entries_unrolled(p) for p in un.paths) == sorted(st.paths)
    order = [
        un.paths.index(next(u for u in un.paths if _entries_unrolled(u) == e)) for e in st.paths
    ]
    s_state, u_state = st.init(params), un.init(_unrolled_params(params))
    assert s_state.adapters.pairs["layers/up"].a.shape == (L, D, 1)
    s_pairs = st.unstacked(s_state.adapters).pairs
    for p in un.paths:  # the same initial pairs, entry by entry
        np.testing.assert_array_equal(s_pairs[_entries_unrolled(p)].a, u_state.adapters.pairs[p].a)
    batch = _data()
    outer_steps = 0
    for _ in range(cfg.max_steps):
        s_state, si = st.step(s_state, batch)
        u_state, ui = un.step(u_state, batch)
        np.testing.assert_allclose(si.loss, ui.loss, rtol=1e-5, atol=1e-6)
        for field in ("checked", "outer", "by_cap", "finished"):
            assert bool(getattr(si, field)) == bool(getattr(ui, field)), field
        for field in ("merged", "newly_done", "ranks", "converged", "full"):
            np.testing.assert_array_equal(
                getattr(si, field), np.asarray(getattr(ui, field))[order], err_msg=field
            )
        for field in ("rho_in", "rho_out"):
            np.testing.assert_allclose(
                getattr(si, field),
                np.asarray(getattr(ui, field))[order],
                rtol=1e-4,
                equal_nan=True,
                err_msg=field,
            )
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


@pytest.mark.parametrize(
    "method,extra",
    [
        ("dora", dict(r=2, target_modules=("up", "down"))),
        ("adalora", dict(init_r=3, target_r=1, tinit=4, tfinal=6, delta_t=2)),
    ],
)
def test_dora_and_adalora_stacked_runs_equal_the_unrolled_runs(params, tmp_path, method, extra):
    """DoRA's per-layer magnitude and column norms, AdaLoRA's per-layer triplets under one
    global budget: the same run scanned and unrolled, through finalize and the saved artefact."""
    from aroma_jax.train import artifacts

    cfg = _cfg(method=method, max_steps=20, learning_rate=0.02, **extra)
    st = _trainer(Scanned(), params, cfg, stacked={"layers": L})
    un = _trainer(Unrolled(), _unrolled_params(params), cfg)
    s_state, u_state = st.init(params), un.init(_unrolled_params(params))
    s_pairs = st.unstacked(s_state.adapters).pairs
    for p in un.paths:  # the same init values, entry by entry (DoRA: two modules per layer)
        for x, y in zip(
            jax.tree.leaves(s_pairs[_entries_unrolled(p)]),
            jax.tree.leaves(u_state.adapters.pairs[p]),
            strict=True,
        ):
            np.testing.assert_array_equal(x, y)
    batch = _data()
    unrolled_name = {_entries_unrolled(p): p for p in un.paths}
    by_name = [un.paths.index(unrolled_name[e]) for e in st.paths]
    for _ in range(cfg.max_steps):
        s_state, si = st.step(s_state, batch)
        u_state, ui = un.step(u_state, batch)
        np.testing.assert_allclose(si.loss, ui.loss, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(si.ranks, np.asarray(ui.ranks)[by_name])
    assert st.compiles == 1
    if method == "adalora":  # pruned to the target budget: 1 triplet per (module, layer)
        assert int(si.ranks.sum()) == L
        np.testing.assert_array_equal(
            s_state.ctrl.method_state.kept["layers/up"],
            np.stack([u_state.ctrl.method_state.kept[f"layers_{i}/up"] for i in range(L)]),
        )
    s_fin, u_fin = st.finalize(s_state), un.finalize(u_state)
    assert st.ranks(s_fin) == {_entries_unrolled(p): r for p, r in un.ranks(u_fin).items()}
    with st.applied(s_fin) as p:
        y_s = Scanned().apply({"params": p}, batch["x"])
    with un.applied(u_fin) as p:
        y_u = Unrolled().apply({"params": p}, batch["x"])
    np.testing.assert_allclose(y_s, y_u, rtol=1e-5, atol=1e-6)
    # The artefact (one entry per layer) rebuilds the same scanned model.
    artifacts.save_final(tmp_path / "final", st, s_fin)
    rebuilt = artifacts.rebuild_state(st, params, tmp_path / "final")
    with st.applied(rebuilt) as p:
        np.testing.assert_allclose(Scanned().apply({"params": p}, batch["x"]), y_s, atol=1e-6)
    assert st.ranks(rebuilt) == st.ranks(s_fin)


def test_dora_with_dropout_on_scanned_layers(params):
    cfg = _cfg(method="dora", r=2, adapter_dropout=0.3, max_steps=3)
    st = _trainer(Scanned(), params, cfg, stacked={"layers": L})
    state = st.init(params)
    losses = []
    for _ in range(cfg.max_steps):
        state, info = st.step(state, _data())
        losses.append(float(info.loss))
    assert np.all(np.isfinite(losses)) and st.compiles == 1
    mag = state.adapters.pairs["layers/up"].magnitude
    start = st.init(params).adapters.pairs["layers/up"].magnitude
    assert mag.shape == (L, D) and not np.allclose(mag, start)


def test_stacked_dora_and_adalora_shard_and_match_one_device(params):
    from jax.sharding import PartitionSpec as P

    from aroma_jax.core import sharding

    batch = _data()
    for method, extra in (
        ("dora", dict(r=2)),
        ("adalora", dict(init_r=3, target_r=1, tinit=1, tfinal=1, delta_t=1)),
    ):
        cfg = _cfg(method=method, max_steps=4, **extra)
        losses = {}
        for mesh_spec in (None, "fsdp=4,tensor=2"):
            st = _trainer(Scanned(), params, cfg, stacked={"layers": L})
            state = st.init(params)
            if mesh_spec:
                mesh = sharding.parse_mesh(mesh_spec)
                specs = sharding.state_shardings(st, state, mesh)
                pair = specs.adapters.pairs["layers/up"]
                if method == "dora":  # the magnitude follows b's output axis, layers replicated
                    assert pair.magnitude.spec == P(None, *pair.b.spec[2:])
                else:
                    assert pair.singular.spec == P()
                state = sharding.shard_trainer(st, state, mesh)
            losses[mesh_spec] = []
            for _ in range(cfg.max_steps):
                state, info = st.step(state, batch)
                losses[mesh_spec].append(float(info.loss))
            assert st.compiles == 1
        np.testing.assert_allclose(losses["fsdp=4,tensor=2"], losses[None], rtol=1e-5)
