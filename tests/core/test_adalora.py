"""AdaLoRA: budget schedule, rank allocation against PEFT's RankAllocator, the train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aroma_jax import AromaConfig, AromaTrainer, ConfigError
from aroma_jax.core.adapters import Pair
from aroma_jax.core.methods import adalora
from aroma_jax.examples.toy import batches, make_problem, toy_config

SHAPES = {"l1": (6, 5), "l2": (4, 7), "l3": (5, 5)}  # (in, out)
KW = dict(init_r=4, target_r=2, tinit=2, tfinal=3, delta_t=2, max_steps=14)


def cfg_for(**kw):
    return AromaConfig(target_modules=tuple(SHAPES), method="adalora", **{**KW, **kw})


def test_config_rules_and_scale():
    cfg = cfg_for()
    assert cfg.pair_rank == 4 and cfg.rank_capacity_derived == 1
    assert cfg.scale == pytest.approx(cfg.alpha / (4 + 1e-5), rel=1e-12)
    with pytest.raises(ConfigError, match="target_r"):
        cfg_for(target_r=5)
    with pytest.raises(ConfigError, match="tinit"):
        cfg_for(tinit=11)  # no budgeting phase left before max_steps - tfinal
    with pytest.raises(ConfigError, match="ipt_beta1"):
        cfg_for(ipt_beta1=1.0)


def test_budget_table_is_peft_budget_schedule():
    peft_layer = pytest.importorskip("peft.tuners.adalora.layer")
    peft = pytest.importorskip("peft")
    cfg = cfg_for(max_steps=40, tinit=3, tfinal=5, delta_t=3)
    budget, due = adalora.budget_table(cfg, n_modules=3)
    alloc = peft_layer.RankAllocator.__new__(peft_layer.RankAllocator)
    alloc.peft_config = peft.AdaLoraConfig(
        init_r=4, target_r=2, tinit=3, tfinal=5, deltaT=3, total_step=40, target_modules=["x"]
    )
    alloc.init_bgt, alloc.target_bgt = 12, 6
    for step in range(41):
        assert (budget[step], due[step]) == alloc.budget_schedule(step), step
    assert budget[0] == 12 and budget[-1] == 6 and sorted(budget, reverse=True) == list(budget)


def random_pairs(rng, r=4):
    return {
        p: Pair(
            rng.normal(size=(i, r)).astype(np.float32),
            rng.normal(size=(r, o)).astype(np.float32),
            singular=rng.normal(size=r).astype(np.float32),
        )
        for p, (i, o) in SHAPES.items()
    }


def test_allocator_keeps_the_entries_peft_keeps_at_every_step():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, (i, o) in SHAPES.items():
                self.add_module(name, torch.nn.Linear(i, o))

    steps = KW["max_steps"]
    pcfg = peft.AdaLoraConfig(
        init_r=4,
        target_r=2,
        tinit=2,
        tfinal=3,
        deltaT=2,
        total_step=steps,
        target_modules=list(SHAPES),
        lora_alpha=8,
    )
    model = peft.get_peft_model(Net(), pcfg)
    layers = {p: getattr(model.base_model.model, p) for p in SHAPES}
    cfg = cfg_for()
    tables = tuple(jnp.asarray(t) for t in adalora.budget_table(cfg, len(SHAPES)))
    rng = np.random.default_rng(0)
    state = adalora.init(random_pairs(rng))
    allocate = jax.jit(lambda s, p, g, t: adalora.allocate(s, p, g, t, cfg, tables))
    reallocations = 0
    for step in range(steps):
        pairs, grads = random_pairs(rng), random_pairs(rng)
        for p, layer in layers.items():
            for name, val, grad in (
                ("lora_A", pairs[p].a.T, grads[p].a.T),
                ("lora_B", pairs[p].b.T, grads[p].b.T),
                ("lora_E", pairs[p].singular[:, None], grads[p].singular[:, None]),
            ):
                param = getattr(layer, name)["default"]
                param.data.copy_(torch.tensor(val))
                param.grad = torch.tensor(grad)
        before = pcfg.rank_pattern
        model.base_model.update_and_allocate(step)
        state, new_pairs = allocate(state, pairs, grads, jnp.asarray(step))
        for p, layer in layers.items():
            e_pt = layer.lora_E["default"].detach().numpy()[:, 0]
            np.testing.assert_array_equal(np.asarray(new_pairs[p].singular) == 0, e_pt == 0)
            np.testing.assert_array_equal(np.asarray(new_pairs[p].singular), e_pt)
        if pcfg.rank_pattern is not None and pcfg.rank_pattern is not before:
            reallocations += 1
            for p in SHAPES:
                want = np.asarray(pcfg.rank_pattern[f"{p}.lora_E.default"], bool)
                np.testing.assert_array_equal(np.asarray(state.kept[p]), want)
    assert reallocations >= 4
    kept = {p: int(k) for p, k in adalora.ranks(state).items()}
    assert sum(kept.values()) == 2 * len(SHAPES) and len(set(kept.values())) > 1


def test_orth_penalty_is_peft_regulariser():
    rng = np.random.default_rng(1)
    pairs = random_pairs(rng)
    want = np.mean(
        [
            v
            for pr in pairs.values()
            for v in (
                np.linalg.norm(pr.a.T @ pr.a - np.eye(4)),
                np.linalg.norm(pr.b @ pr.b.T - np.eye(4)),
            )
        ]
    )
    np.testing.assert_allclose(float(adalora.orth_penalty(pairs)), want, rtol=1e-5)


def test_adalora_trains_in_one_compile_prunes_to_target_and_finalizes():
    model, student, teacher = make_problem(0)

    def loss_fn(params, batch, rng):
        return jnp.mean(
            jnp.sum((model.apply({"params": params}, batch["x"]) - batch["y"]) ** 2, -1)
        )

    cfg = toy_config().replace(
        method="adalora",
        learning_rate=1e-2,
        max_steps=20,
        warmup_steps=2,
        init_r=4,
        target_r=2,
        tinit=4,
        tfinal=6,
        delta_t=2,
    )
    trainer = AromaTrainer(loss_fn, student, cfg, donate=False)
    state = trainer.init(student)
    ranks = []
    for batch in batches(teacher, model, 16, 20):
        state, info = trainer.step(state, batch)
        ranks.append(int(info.ranks.sum()))
    assert trainer.compiles == 1
    assert ranks[0] == 4 * 3 and ranks[-1] == 2 * 3 and ranks == sorted(ranks, reverse=True)
    x = jax.random.normal(jax.random.key(2), (4, 32))
    with trainer.applied(state) as params:
        before = model.apply({"params": params}, x)
    final = trainer.finalize(state)
    with trainer.applied(final) as params:
        after = model.apply({"params": params}, x)
    np.testing.assert_allclose(after, before, atol=1e-5)
    assert trainer.ranks(final) == trainer.ranks(state)
    assert sum(trainer.ranks(final).values()) == 6
