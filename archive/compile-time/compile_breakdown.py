"""Where the train step's compile time goes: whole steps, then the controller's pieces alone.

    python experiments/compile_breakdown.py [--model roberta-base]

Traces and compiles (never runs) the train step of AROMA, ReLoRA (outer steps without the inner
check) and LoRA (no controller), then, as separate jitted functions on the same shapes, the
outer step (eq. 6, merge, fold, re-init), the optimizer-state prune and full reset, and the
inner check. Prints seconds for trace+lower and for XLA's compile.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench  # noqa: E402

from aroma_jax import AromaConfig, AromaTrainer  # noqa: E402
from aroma_jax.core import controller, optim  # noqa: E402
from aroma_jax.models.hf import PRESETS  # noqa: E402


def timed(name: str, lower) -> None:
    t0 = time.perf_counter()
    lowered = lower()
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    print(f"{name:28s} trace+lower {t1 - t0:6.2f}s  XLA compile {t2 - t1:6.2f}s", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=sorted(bench.SHAPES), default="roberta-base")
    p.add_argument("--batch", type=int, default=8, help="batch size")
    p.add_argument("--seq", type=int, default=128, help="sequence length")
    args = p.parse_args(argv)
    arch, model, loss_fn, vocab = bench.build(args.model, args.seq)
    params, batch = model.params, bench.make_batch(vocab, args.batch, args.seq)
    base = dict(target_modules=PRESETS[arch], max_steps=10**6, inner_max_steps=10**6)
    cfg = AromaConfig(r=1, alpha=2.0, **base)
    trainers = {}
    for method in ("aroma", "relora", "lora"):
        tr = AromaTrainer(loss_fn, params, cfg.replace(method=method), donate=False)
        state = tr.init(params)
        trainers[method] = (tr, state)
        timed(f"train step ({method})", lambda tr=tr, state=state: tr._step.lower(state, batch))
    tr, st = trainers["aroma"]
    trainable = {"pairs": st.adapters.pairs, "extra": st.extra}
    mask = jax.tree.map(lambda _: jnp.ones((), bool), trainable)

    def outer(s):
        kernels = tr.kernels(s.base)
        return controller.outer_step(s.ctrl, s.adapters, kernels, tr.specs, cfg, tr.folded)

    def reset(mode):
        return lambda s: optim.reset(tr.tx, s.opt_state, mask, s.ctrl.key, trainable, mode)

    pieces = {
        "outer step": outer,
        "prune reset": reset("prune"),
        "full reset": reset("full"),
        "inner check": lambda s: controller.inner_check(s.ctrl, s.adapters, cfg),
    }
    for name, fn in pieces.items():
        timed(name, lambda fn=fn: jax.jit(fn).lower(st))


if __name__ == "__main__":
    main()
