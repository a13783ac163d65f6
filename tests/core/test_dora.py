"""DoRA: factored column norms, parity with PEFT's DoRA layer, the train step (no dense dW)."""

import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aroma_jax import AromaTrainer
from aroma_jax.core import inject
from aroma_jax.core.adapters import Pair
from aroma_jax.core.methods import dora
from aroma_jax.examples.toy import D_IN, D_OUT, batches, make_problem, toy_config

IN, OUT, R, ALPHA = 6, 5, 3, 4.0


def factors(seed=0, k=R):
    rng = np.random.default_rng(seed)
    w0 = rng.normal(size=(IN, OUT)).astype(np.float32)
    a = rng.normal(size=(IN, k)).astype(np.float32)
    b = rng.normal(size=(k, OUT)).astype(np.float32)
    return w0, a, b


@pytest.mark.parametrize("k", [1, 3])
def test_column_norms_from_factors_match_dense(k):
    w0, a, b = factors(1, k)
    want = np.linalg.norm(w0 + 0.7 * a @ b, axis=0)
    got = dora.column_norms(dora.column_sq_norms(w0), w0, a, b, 0.7)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_merged_kernel_has_the_magnitude_as_column_norms():
    w0, a, b = factors(2)
    m = np.abs(np.random.default_rng(3).normal(size=OUT)).astype(np.float32) + 0.5
    w = dora.merged_kernel(w0, a, b, m, 0.5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(w), axis=0), m, rtol=1e-5)


class Lin(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(OUT, name="lin")(x)


def flax_dora(x, w0, bias, a, b, m, scale):
    """The Flax layer with DoRA through `inject`, as the trainer applies it."""
    params = {"lin": {"kernel": w0, "bias": bias}}
    col_sq = dora.column_sq_norms(w0)
    f = dora.factor(m, col_sq, w0, a, b, scale)
    with inject.adapters_applied({"lin": (Pair(a, b), None)}, scale, column_scale={"lin": f}):
        return Lin().apply({"params": params}, x)


def test_forward_and_gradients_match_peft_dora_layer():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    rng = np.random.default_rng(4)
    w0, a, b = factors(5)
    bias = rng.normal(size=OUT).astype(np.float32)
    m = (np.linalg.norm(w0, axis=0) * rng.uniform(0.5, 1.5, OUT)).astype(np.float32)
    x = rng.normal(size=(2, 7, IN)).astype(np.float32)
    g = rng.normal(size=(2, 7, OUT)).astype(np.float32)

    base = torch.nn.Sequential()
    base.add_module("lin", torch.nn.Linear(IN, OUT))
    with torch.no_grad():
        base.lin.weight.copy_(torch.tensor(w0.T))
        base.lin.bias.copy_(torch.tensor(bias))
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["lin"], use_dora=True)
    pm = peft.get_peft_model(base, cfg)
    layer = pm.base_model.model.lin
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.tensor(a.T))
        layer.lora_B["default"].weight.copy_(torch.tensor(b.T))
        layer.lora_magnitude_vector["default"].weight.copy_(torch.tensor(m))
    tx = torch.tensor(x, requires_grad=True)
    y_pt = pm(tx)
    (y_pt * torch.tensor(g)).sum().backward()

    scale = ALPHA / R
    y = flax_dora(x, w0, bias, a, b, m, scale)
    np.testing.assert_allclose(np.asarray(y), y_pt.detach().numpy(), atol=1e-5)
    grads = jax.grad(
        lambda x_, a_, b_, m_: jnp.sum(flax_dora(x_, w0, bias, a_, b_, m_, scale) * g),
        argnums=(0, 1, 2, 3),
    )(x, a, b, m)
    dx, da, db, dm = (np.asarray(t) for t in grads)
    np.testing.assert_allclose(dx, tx.grad.numpy(), atol=1e-5)
    np.testing.assert_allclose(da, layer.lora_A["default"].weight.grad.numpy().T, atol=1e-5)
    np.testing.assert_allclose(db, layer.lora_B["default"].weight.grad.numpy().T, atol=1e-5)
    pt_dm = layer.lora_magnitude_vector["default"].weight.grad.numpy()
    np.testing.assert_allclose(dm, pt_dm, atol=1e-5)

    # The norm is detached: with it differentiated, the gradients of a differ (the check bites).
    def undetached(a_):
        n = jnp.linalg.norm(w0 + scale * a_ @ b, axis=0)
        return jnp.sum(((x @ (w0 + scale * a_ @ b)) * (m / n) + bias) * g)

    assert np.abs(np.asarray(jax.grad(undetached)(a)) - da).max() > 1e-3


def toy(method_kw, steps=12):
    model, student, teacher = make_problem(0)

    def loss_fn(params, batch, rng):
        pred = model.apply({"params": params}, batch["x"])
        return jnp.mean(jnp.sum((pred - batch["y"]) ** 2, axis=-1))

    cfg = toy_config().replace(method="dora", r=2, alpha=4.0, learning_rate=1e-2, **method_kw)
    trainer = AromaTrainer(loss_fn, student, cfg, donate=False)
    state = trainer.init(student)
    return trainer, state, model, teacher, list(batches(teacher, model, 16, steps))


def test_dora_trains_in_one_compile_and_finalize_keeps_the_function():
    trainer, state, model, teacher, data = toy({})
    kernels = trainer.kernels(state.base)
    for p, pair in state.adapters.pairs.items():  # m starts at |W0_j|: the model is unchanged
        np.testing.assert_allclose(pair.magnitude, np.linalg.norm(kernels[p], axis=0), rtol=1e-6)
    m0 = {p: np.asarray(pr.magnitude) for p, pr in state.adapters.pairs.items()}
    losses = []
    for batch in data:
        state, info = trainer.step(state, batch)
        losses.append(float(info.loss))
    assert trainer.compiles == 1
    assert losses[-1] < losses[0]
    assert any(
        np.abs(np.asarray(pr.magnitude) - m0[p]).max() > 1e-4
        for p, pr in state.adapters.pairs.items()
    )
    x = jax.random.normal(jax.random.key(1), (4, D_IN))
    with trainer.applied(state) as params:
        before = model.apply({"params": params}, x)
    final = trainer.finalize(state)
    with trainer.applied(final) as params:
        after = model.apply({"params": params}, x)
    np.testing.assert_allclose(after, before, atol=1e-5)
    assert set(trainer.ranks(final).values()) == {2}


def _dense_outputs(jaxpr, shape, found=None):
    found = [] if found is None else found
    for eqn in jaxpr.eqns:
        found += [eqn.primitive.name for v in eqn.outvars if getattr(v.aval, "shape", ()) == shape]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _dense_outputs(inner, shape, found)
    return found


def test_dora_step_forms_no_dense_in_out_array():
    trainer, state, model, teacher, data = toy({}, steps=1)
    jaxpr = jax.make_jaxpr(trainer._step_impl)(state, data[0]).jaxpr
    assert _dense_outputs(jaxpr, (D_IN, D_OUT)) == []
    # The detector finds the dense direction a naive DoRA forms.
    w0, a, b = jnp.ones((D_IN, D_OUT)), jnp.ones((D_IN, 2)), jnp.ones((2, D_OUT))
    naive = jax.make_jaxpr(lambda w, a, b: jnp.linalg.norm(w + a @ b, axis=0))(w0, a, b).jaxpr
    assert _dense_outputs(naive, (D_IN, D_OUT))


def test_dropout_matches_peft_dora_in_training_mode():
    # PEFT's DoRA with dropout: y + (f - 1) * (x' W0) + f * s * B A x' for the dropped x'.
    # Its dropout module is replaced by one applying our mask, so both see the same x'.
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    rng = np.random.default_rng(6)
    w0, a, b = factors(7)
    bias = rng.normal(size=OUT).astype(np.float32)
    m = (np.linalg.norm(w0, axis=0) * rng.uniform(0.5, 1.5, OUT)).astype(np.float32)
    x = rng.normal(size=(3, IN)).astype(np.float32)
    rate, key, scale = 0.3, jax.random.key(5), ALPHA / R
    params = {"lin": {"kernel": w0, "bias": bias}}
    f = dora.factor(m, dora.column_sq_norms(w0), w0, a, b, scale)
    with inject.adapters_applied(
        {"lin": (Pair(a, b), None)}, scale, dropout=(rate, key), column_scale={"lin": f}
    ):
        y = np.asarray(Lin().apply({"params": params}, x))
    # The mask `adapters_applied` draws for the first call of "lin".
    k = jax.random.fold_in(jax.random.fold_in(key, zlib.crc32(b"lin") & 0x7FFFFFFF), 1)
    xd = np.asarray(inject.dropped(jnp.asarray(x), rate, k))
    assert (xd == 0).any() and not np.allclose(xd, x)

    class Fixed(torch.nn.Module):
        def forward(self, t):
            return torch.tensor(xd)

    base = torch.nn.Sequential()
    base.add_module("lin", torch.nn.Linear(IN, OUT))
    with torch.no_grad():
        base.lin.weight.copy_(torch.tensor(w0.T))
        base.lin.bias.copy_(torch.tensor(bias))
    cfg = peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=["lin"], use_dora=True, lora_dropout=rate
    )
    pm = peft.get_peft_model(base, cfg).train()
    layer = pm.base_model.model.lin
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.tensor(a.T))
        layer.lora_B["default"].weight.copy_(torch.tensor(b.T))
        layer.lora_magnitude_vector["default"].weight.copy_(torch.tensor(m))
    layer.lora_dropout["default"] = Fixed()
    with torch.no_grad():
        want = pm(torch.tensor(x)).numpy()
    np.testing.assert_allclose(y, want, atol=1e-5)
