"""A/B of the adapter path for unfolded frozen factors (bf16 bases, ``fold="never"``).

    python experiments/ab_joint.py [--model roberta-base] [--merges 16] [--rounds 8]

``joint``: the trainable pair and the frozen factors in one contraction, ``x @ [A | a]`` then
``@ [B; b]`` (`aroma_jax.core.inject.joint_delta`, what the library does). ``split``: the pair and
the frozen factors as two separate low-rank paths (what it did before). Both after ``--merges``
merges in every module, timed interleaved in one process against the floor (a zero bias per
target module), medians of paired per-round ratios, as in ``bench.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench  # noqa: E402

from aroma_jax import AromaConfig  # noqa: E402
from aroma_jax.core import inject  # noqa: E402
from aroma_jax.models.hf import PRESETS  # noqa: E402


def split_delta(x, a, b, frozen_a, frozen_b, scale):
    return inject.lowrank_delta(x, a, b, scale) + inject.frozen_delta(x, frozen_a, frozen_b, scale)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=sorted(bench.SHAPES), default="roberta-base")
    p.add_argument("--batch", type=int, default=8, help="batch size")
    p.add_argument("--seq", type=int, default=128, help="sequence length")
    p.add_argument("--merges", type=int, default=16, help="merges in every module first")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    args = p.parse_args(argv)
    arch, model, loss_fn, vocab = bench.build(args.model, args.seq)
    batch = bench.make_batch(vocab, args.batch, args.seq)
    cfg = AromaConfig(
        target_modules=PRESETS[arch],
        r=1,
        alpha=2.0,
        rank_capacity=32,
        fold="never",
        max_steps=10**6,
        inner_max_steps=10**6,
        warmup_steps=0,
        rewarmup_steps=0,
    )
    joint = inject.joint_delta
    runs = {}
    for name, impl in (("split", split_delta), ("joint", joint)):
        inject.joint_delta = impl  # read when the step is traced, i.e. at its first call
        runs[name] = bench.Variant(name, loss_fn, model.params, cfg, args.merges)
        bench.block(runs[name](batch))
    inject.joint_delta = joint
    runs["floor"] = bench.Floor(loss_fn, runs["joint"].trainer, model.params)
    bench.block(runs["floor"](batch))
    times = {k: [] for k in runs}
    for r in range(args.rounds):
        for name, run in runs.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                out = run(batch)
            bench.block(out)
            times[name].append((time.perf_counter() - t) / args.steps)
        print(f"round {r + 1}: " + ", ".join(f"{k}={v[-1] * 1e3:.0f}ms" for k, v in times.items()))
    out = {}
    for name in runs:
        paired = statistics.median(t / f for t, f in zip(times[name], times["floor"], strict=True))
        out[name] = {"ms": statistics.median(times[name]) * 1e3, "paired_x_floor": paired}
        print(f"{name:6s} {out[name]['ms']:8.1f} ms/step  {paired:.3f}x floor (paired)")
    print(f"device: {jax.devices()[0].device_kind}; commit {bench._commit()}")
    return out


if __name__ == "__main__":
    main()
