"""Adapters on Flax NNX modules (`aroma_jax.core.nnx_adapt`): the same run as linen, the
adapter really applied at the right scale, no dense update, the user's module untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aroma_jax import AromaTrainer, ConfigError, NnxTrainer
from aroma_jax.core import inject, sharding
from aroma_jax.core.adapters import Pair
from aroma_jax.core.nnx_adapt import NnxModel, einsum_in_ndim
from aroma_jax.examples.toy import D_IN, D_OUT, TRUE_RANKS, batches, make_problem, toy_config
from tests.core.test_train_step import dense_outputs, loss_for


class NnxToy(nnx.Module):
    """The NNX twin of `aroma_jax.examples.toy.ToyModel`: three Linear layers, outputs joined."""

    def __init__(self, kernels):
        rngs = nnx.Rngs(0)
        for name in TRUE_RANKS:
            layer = nnx.Linear(D_IN, D_OUT, use_bias=False, rngs=rngs)
            layer.kernel[...] = kernels[name]["kernel"]
            setattr(self, name, layer)

    def __call__(self, x):
        return jnp.concatenate([getattr(self, n)(x) for n in TRUE_RANKS], axis=-1)


class EinsumToy(nnx.Module):
    """The same function through ``nnx.Einsum`` layers whose kernels are ``(in, heads, dim)``:
    ``m0`` and ``m3`` project ``btd,dnh->btnh``; ``m1`` contracts two axes, ``btnh,nhd->btd``."""

    def __init__(self, kernels):
        rngs = nnx.Rngs(0)
        self.m0 = nnx.Einsum("btd,dnh->btnh", (D_IN, 4, D_OUT // 4), rngs=rngs)
        self.m1 = nnx.Einsum("btnh,nhd->btd", (4, D_IN // 4, D_OUT), rngs=rngs)
        self.m3 = nnx.Einsum("btd,dnh->btnh", (D_IN, 4, D_OUT // 4), rngs=rngs)
        for name in TRUE_RANKS:
            layer = getattr(self, name)
            layer.kernel[...] = kernels[name]["kernel"].reshape(layer.kernel.shape)

    def __call__(self, x):
        t = x[:, None, :]  # (batch, 1 token, in)
        y0 = self.m0(t).reshape(x.shape[0], -1)
        y1 = self.m1(t.reshape(x.shape[0], 1, 4, D_IN // 4)).reshape(x.shape[0], -1)
        y3 = self.m3(t).reshape(x.shape[0], -1)
        return jnp.concatenate([y0, y1, y3], axis=-1)


def mse(module, batch, rng):
    return jnp.mean(jnp.sum((module(batch["x"]) - batch["y"]) ** 2, axis=-1))


def run(trainer, state, teacher, model, steps):
    losses, ranks = [], []
    for batch in batches(teacher, model, 32, steps):
        state, info = trainer.step(state, batch)
        losses.append(float(info.loss))
        ranks.append(np.asarray(info.ranks))
    return state, np.array(losses), np.array(ranks)


@pytest.mark.parametrize("net_cls", [NnxToy, pytest.param(EinsumToy, marks=pytest.mark.slow)])
def test_nnx_and_linen_take_the_same_aroma_run_with_merges(net_cls):
    cfg = toy_config(max_steps=80, inner_check_every=10, inner_max_steps=20)
    model, student, teacher = make_problem(0)
    linen = AromaTrainer(loss_for(model), student, cfg, donate=False)
    _, want_loss, want_ranks = run(linen, linen.init(student), teacher, model, 80)
    trainer = NnxTrainer(net_cls(student), mse, cfg, donate=False)
    assert set(trainer.specs) == set(TRUE_RANKS)
    _, loss, ranks = run(trainer, trainer.init(), teacher, model, 80)
    err = np.abs(loss - want_loss).max()
    print(f"{net_cls.__name__}: max |loss - linen loss| = {err:.2e}, ranks {ranks[-1]}")
    assert err < 1e-4
    assert ranks.max() >= 1, "the run merged pairs"
    np.testing.assert_array_equal(ranks, want_ranks)
    assert trainer.compiles == 1


def test_adapter_applied_at_scale_alpha_over_r_and_user_module_untouched():
    model, student, teacher = make_problem(0)
    net = NnxToy(student)
    before = jax.tree.map(np.asarray, nnx.state(net))
    cfg = toy_config(r=2, alpha=6.0, max_steps=10, warmup_steps=0, learning_rate=1e-2)
    trainer = NnxTrainer(net, mse, cfg, donate=False)
    state = trainer.init()
    for batch in batches(teacher, model, 32, 3):
        state, _ = trainer.step(state, batch)
    x = next(batches(teacher, model, 8, 1, seed=9))["x"]
    with trainer.adapted(state) as tuned:
        got = np.asarray(tuned(x))
    frozen = np.asarray(net(x))
    assert np.abs(got - frozen).max() > 1e-4, "the trained adapter changes the output"
    # A plain reference: y = x W0 + (alpha / r) x a b per module.
    want = []
    for name in TRUE_RANKS:
        pair = state.adapters.pairs[name]
        w0 = np.asarray(student[name]["kernel"])
        want.append(x @ w0 + 3.0 * (x @ np.asarray(pair.a)) @ np.asarray(pair.b))
    np.testing.assert_allclose(got, np.concatenate(want, -1), atol=1e-5)
    # The user's module: same classes, same state, bit for bit, and the same function.
    assert type(net.m0) is nnx.Linear and not hasattr(net.m0, "aroma_path")
    after = jax.tree.map(np.asarray, nnx.state(net))
    assert jax.tree.all(jax.tree.map(np.array_equal, before, after))
    np.testing.assert_array_equal(np.asarray(net(x)), frozen)


def test_nnx_step_forms_no_dense_update():
    _, student, _ = make_problem(0)
    cfg = toy_config(fold="never", rank_capacity=5, max_steps=40)
    batch = {"x": jnp.ones((8, D_IN)), "y": jnp.ones((8, 3 * D_OUT))}
    for net in (NnxToy(student), EinsumToy(student)):
        trainer = NnxTrainer(net, mse, cfg, donate=False)
        jaxpr = jax.make_jaxpr(trainer._step_impl)(trainer.init(), batch).jaxpr
        # The einsum kernels' (in, out) views for eq. 6 are reshapes of the kernel itself;
        # nothing may compute an update of the kernel's size, in either layout.
        shapes = {(D_IN, D_OUT)} | {tuple(getattr(net, n).kernel.shape) for n in TRUE_RANKS}
        computed = [f for s in shapes for f in dense_outputs(jaxpr, s) if f[0] != "reshape"]
        assert computed == []


@pytest.mark.parametrize(
    "method",
    ["dora", *(pytest.param(m, marks=pytest.mark.slow) for m in ("lora", "relora", "adalora"))],
)
def test_every_method_matches_linen(method):
    extra = {"adalora": {"init_r": 4, "target_r": 2, "tinit": 5, "tfinal": 5}}.get(method, {})
    cfg = toy_config(method=method, max_steps=30, warmup_steps=0, inner_max_steps=10, **extra)
    model, student, teacher = make_problem(0)
    linen = AromaTrainer(loss_for(model), student, cfg, donate=False)
    _, want, want_ranks = run(linen, linen.init(student), teacher, model, 30)
    trainer = NnxTrainer(NnxToy(student), mse, cfg, donate=False)
    _, got, ranks = run(trainer, trainer.init(), teacher, model, 30)
    assert np.abs(got - want).max() < 1e-4
    np.testing.assert_array_equal(ranks, want_ranks)
    assert want[-1] < want[0]


@pytest.mark.slow
def test_sharded_nnx_step_compiles_once_and_matches():
    _, student, teacher = make_problem(0)
    model = make_problem(0)[0]
    cfg = toy_config(max_steps=20)
    trainer = NnxTrainer(NnxToy(student), mse, cfg, donate=False)
    plain = NnxTrainer(NnxToy(student), mse, cfg, donate=False)
    state = sharding.shard_trainer(trainer, trainer.init(), sharding.parse_mesh("fsdp=4,tensor=2"))
    _, got, _ = run(trainer, state, teacher, model, 5)
    _, want, _ = run(plain, plain.init(), teacher, model, 5)
    assert np.abs(got - want).max() < 1e-5 and trainer.compiles == 1


def test_bad_input_one_line_errors():
    assert einsum_in_ndim("BTD,DNH->BTNH") == 1 and einsum_in_ndim("btnh,nhd->btd") == 2
    assert einsum_in_ndim("BTD,KDNH->KBTNH") is None and einsum_in_ndim("btd,dh->bht") is None

    class Kv(nnx.Module):
        def __init__(self):
            self.kv = nnx.Einsum("btd,kdh->kbth", (2, 8, 4), rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.kv(x)

    with pytest.raises(ConfigError, match="'kv' cannot take an adapter: einsum 'btd,kdh->kbth'"):
        NnxTrainer(Kv(), mse, toy_config(target_modules=("kv",)))
    with pytest.raises(TypeError, match="takes a flax.nnx.Module, got dict"):
        NnxTrainer({"kernel": jnp.ones((2, 2))}, mse, toy_config())


def test_linear_general_and_remat_get_the_adapter_of_their_flat_kernel():
    class Net(nnx.Module):
        def __init__(self):
            rngs = nnx.Rngs(0)
            self.gen = nnx.LinearGeneral((4, 2), 3, axis=(-2, -1), rngs=rngs)
            self.lin = nnx.Linear(3, 5, rngs=rngs)

        def block(self, x):
            return self.lin(inputs=self.gen(x))  # a keyword input too

        def __call__(self, x):  # as tunix's RematConfig.BLOCK: nnx.remat splits and merges
            return nnx.remat(Net.block)(self, x)

    net = Net()
    view = NnxModel(net)
    assert view.in_ndim == {"gen": 2, "lin": 1} and view.params["gen"]["kernel"].shape == (4, 2, 3)
    x = jax.random.normal(jax.random.key(1), (2, 4, 2))
    pa = Pair(
        jax.random.normal(jax.random.key(2), (8, 2)), jax.random.normal(jax.random.key(3), (2, 3))
    )
    pl = Pair(
        jax.random.normal(jax.random.key(4), (3, 1)), jax.random.normal(jax.random.key(5), (1, 5))
    )
    with inject.adapters_applied({"gen": (pa, None), "lin": (pl, None)}, scale=0.5) as hits:
        got = view.module(view.params)(x)
    assert hits == {"gen", "lin"}
    p = jax.tree.map(np.asarray, view.params)
    h = x.reshape(2, 8) @ (p["gen"]["kernel"].reshape(8, 3) + 0.5 * pa.a @ pa.b) + p["gen"]["bias"]
    want = h @ (p["lin"]["kernel"] + 0.5 * pl.a @ pl.b) + p["lin"]["bias"]
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
