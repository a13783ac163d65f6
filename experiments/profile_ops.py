"""Top XLA ops of the train steps traced by ``aroma-jax train --profile START:STOP``.

    aroma-jax train --config experiments/configs/tiny-llama.yaml --output runs/prof \\
        --profile 6:10 --set aroma.max_steps=12
    python experiments/profile_ops.py runs/prof --steps 4 --top 12

Reads the run's Perfetto trace (``DIR/profile/plugins/profile/*/perfetto_trace.json.gz``) and
prints a markdown table of the ops with the most self time per step
(`aroma_jax.train.throughput.top_ops`), with the run's ``step_ms`` for scale.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
from pathlib import Path

from aroma_jax.train import throughput


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a run directory trained with --profile")
    p.add_argument("--steps", type=int, required=True, help="how many steps the window traced")
    p.add_argument("--top", type=int, default=12, help="how many ops to list")
    args = p.parse_args(argv)
    trace = throughput.trace_file(args.run / "profile")
    ops = throughput.top_ops(trace, args.steps, args.top)
    summary = args.run / "summary.json"
    step_ms = json.loads(summary.read_text()).get("step_ms") if summary.is_file() else None
    print(f"trace: {trace}; run step_ms (untraced steps): {step_ms}\n")
    print("| op | ms per step (self) | share of traced op time | calls per step |")
    print("|---|---:|---:|---:|")
    for o in ops:
        ms, share, calls = o["ms_per_step"], o["share"], o["calls_per_step"]
        print(f"| `{o['op']}` | {ms:.3f} | {share:.1%} | {calls} |")
    every = throughput.top_ops(trace, args.steps, n=10**9)
    kinds: collections.Counter = collections.Counter()
    for o in every:  # "ynn_fusion.22" -> "ynn_fusion": one row per kind of op
        kinds[re.sub(r"\.\d+$", "", o["op"])] += o["ms_per_step"]
    total = sum(kinds.values()) or 1.0
    print(f"\n{len(every)} ops in all, {total:.1f} ms of XLA thread time per step, by kind:\n")
    print("| kind of op | ms per step (self) | share |")
    print("|---|---:|---:|")
    for kind, ms in kinds.most_common(args.top):
        print(f"| `{kind}` | {ms:.1f} | {ms / total:.1%} |")
    return ops


if __name__ == "__main__":
    main()
