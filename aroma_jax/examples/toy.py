"""Toy rank recovery: a student with frozen ``W0`` learns a teacher ``W0 + dW*``.

Three independent linear modules (``m0``, ``m1``, ``m3``) whose true updates have ranks 0, 1
and 3 with well separated singular values. AROMA should find those ranks by itself; LoRA r=8
reaches the same loss with many more trainable parameters. Runs in seconds on a CPU.

Example:
    >>> result = run_toy(AromaConfig(target_modules=("m.*",), max_steps=40), steps=40)
    >>> sorted(result["ranks"])
    ['m0', 'm1', 'm3']
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aroma_jax.core import loop
from aroma_jax.core.adapters import adapter_param_count
from aroma_jax.core.config import AromaConfig
from aroma_jax.core.train_step import AromaTrainer

TRUE_RANKS = {"m0": 0, "m1": 1, "m3": 3}
D_IN, D_OUT = 32, 24


class ToyModel(nn.Module):
    """Three Dense modules reading the same input; outputs concatenated."""

    @nn.compact
    def __call__(self, x):
        return jnp.concatenate(
            [nn.Dense(D_OUT, use_bias=False, name=n)(x) for n in TRUE_RANKS], axis=-1
        )


def make_problem(seed: int = 0, singular_values=(1.6, 1.1, 0.8)):
    """(model, student params, teacher params); teacher = student + planted low-rank updates."""
    rng = np.random.default_rng(seed)
    model = ToyModel()
    student = {}
    teacher = {}
    for name, rank in TRUE_RANKS.items():
        w0 = rng.normal(0, 1 / np.sqrt(D_IN), (D_IN, D_OUT)).astype(np.float32)
        u, _ = np.linalg.qr(rng.normal(size=(D_IN, D_IN)))
        v, _ = np.linalg.qr(rng.normal(size=(D_OUT, D_OUT)))
        dw = sum(singular_values[i] * np.outer(u[:, i], v[:, i]) for i in range(rank))
        student[name] = {"kernel": jnp.asarray(w0)}
        teacher[name] = {"kernel": jnp.asarray(w0 + dw, dtype=jnp.float32)}
    return model, student, teacher


def batches(teacher, model, batch_size: int, steps: int, seed: int = 1):
    key = jax.random.key(seed)
    apply = jax.jit(lambda x: model.apply({"params": teacher}, x))
    for _ in range(steps):
        key, sub = jax.random.split(key)
        x = jax.random.normal(sub, (batch_size, D_IN))
        yield {"x": x, "y": apply(x)}


def squared_error_loss(model: nn.Module):
    """``loss_fn(params, batch, rng)``: summed squared error of ``model`` against the teacher."""

    def loss_fn(params, batch, rng):
        pred = model.apply({"params": params}, batch["x"])
        return jnp.mean(jnp.sum((pred - batch["y"]) ** 2, axis=-1))

    return loss_fn


def train_toy(cfg: AromaConfig, steps: int, batch_size: int = 16, seed: int = 0):
    """(trainer, state, history) after ``steps`` steps on the toy, not finalized."""
    model, student, teacher = make_problem(seed)
    trainer = AromaTrainer(squared_error_loss(model), student, cfg)
    batches_ = batches(teacher, model, batch_size, steps)
    state, history = loop.run(trainer, trainer.init(student), batches_)
    return trainer, state, history


def toy_config(**overrides) -> AromaConfig:
    """Settings under which AROMA recovers the planted ranks (see tests/test_toy.py)."""
    cfg = AromaConfig(
        target_modules=("m.*",),
        r=1,
        alpha=1.0,
        learning_rate=5e-3,
        inner_tol=0.02,
        inner_check_every=20,
        inner_max_steps=400,
        outer_tol=0.02,
        max_steps=3000,
        warmup_steps=20,
        rewarmup_steps=20,
        schedule="constant",
    )
    return cfg.replace(**overrides)


def run_toy(cfg: AromaConfig, steps: int | None = None, batch_size: int = 64, seed: int = 0):
    """Trains on the toy; returns ranks, final loss, adapter params, outer steps and compiles."""
    model, student, teacher = make_problem(seed)
    loss_fn = squared_error_loss(model)
    eval_batch = next(batches(teacher, model, 1024, 1, seed + 2))
    start_loss = float(loss_fn(student, eval_batch, None))
    trainer = AromaTrainer(loss_fn, student, cfg)
    state = trainer.init(student)  # the state owns (and the step donates) these buffers
    start = time.perf_counter()
    state, history = loop.run(
        trainer, state, batches(teacher, model, batch_size, steps or cfg.max_steps, seed + 1)
    )
    state = trainer.finalize(state)
    with trainer.applied(state) as params:
        final = float(loss_fn(params, eval_batch, None))
    return {
        "ranks": trainer.ranks(state),
        "true_ranks": dict(TRUE_RANKS),
        "loss_before": start_loss,
        "loss_after": final,
        "adapter_params": adapter_param_count(state.adapters),
        "outer_steps": history.outer_step_numbers(),
        "compiles": trainer.compiles,
        "steps": int(state.ctrl.step),
        "wall_s": time.perf_counter() - start,
        "history": history,
        "trainer": trainer,
        "state": state,
    }


def main() -> None:
    aroma = toy_config()
    lora8 = aroma.replace(method="lora", r=8, alpha=8.0)
    for name, cfg in (("aroma", aroma), ("lora-r8", lora8)):
        res = run_toy(cfg)
        print(
            f"{name:8s} ranks={res['ranks']} true={res['true_ranks']} "
            f"loss {res['loss_before']:.4f} -> {res['loss_after']:.6f} "
            f"adapter_params={res['adapter_params']} outer_steps={len(res['outer_steps'])} "
            f"steps={res['steps']} compiles={res['compiles']} wall={res['wall_s']:.1f}s"
        )


if __name__ == "__main__":
    main()
