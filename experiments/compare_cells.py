"""Paired comparison of run cells from different study directories (e.g. the native demo cells
of ``experiments/study/demo-lr.yaml`` against the HF Flax ones of ``demo-impl.yaml``).

    python -m experiments.compare_cells --metric accuracy \\
        "AROMA native=runs/demo-lr/rotten_tomatoes/aroma/lr0.002/seed{seed}" \\
        "AROMA HF Flax=runs/demo-impl/rotten_tomatoes/aroma_hf/seed{seed}" \\
        --pair "AROMA native" "AROMA HF Flax"

Each ``LABEL=PATTERN`` names one run directory per seed (``{seed}`` filled in). Prints the test
score per seed, mean +- std, the final adapters' validation score (`study.final_validation`) and
each ``--pair``'s mean difference with its 95% t interval and paired t-test p.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from scipy import stats

from experiments.study import final_validation


def _mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f} (n={len(xs)})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="LABEL=PATTERN, PATTERN with {seed}")
    p.add_argument("--metric", default="accuracy", help="metric to compare (default accuracy)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A", "B"))
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    test: dict[str, list[float]] = {}
    print(f"| run | {' | '.join(f'seed {s}' for s in seeds)} | test | final validation |")
    print("|---|" + "---:|" * (len(seeds) + 2))
    for item in args.runs:
        label, pattern = item.split("=", 1)
        runs = [Path(pattern.format(seed=s)) for s in seeds]
        summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
        test[label] = [s["metrics"][args.metric] for s in summaries]
        val = [(final_validation(r) or {})[args.metric] for r in runs]
        cells = " | ".join(f"{x:.3f}" for x in test[label])
        print(f"| {label} | {cells} | {_mean_std(test[label])} | {_mean_std(val)} |")
    for a, b in args.pair:
        d = [x - y for x, y in zip(test[a], test[b], strict=True)]
        m, h = statistics.mean(d), stats.t.ppf(0.975, len(d) - 1) * statistics.stdev(d)
        h /= math.sqrt(len(d))
        pv = stats.ttest_rel(test[a], test[b]).pvalue
        print(f"{a} - {b}: {m:+.4f} [{m - h:+.4f}, {m + h:+.4f}], p {pv:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
