"""AROMA's train-step compile against LoRA's, side by side, on XLA:CPU or for a TPU topology.

    python experiments/compile_ratio.py --repeats 5 --out docs/scale/compile-ratio-cpu-L2.json -- \
        --model llama-small --devices 1 --batch 8 --seq 128 --layers 2

    # the same step compiled by XLA's TPU compiler (libtpu runs on a host without a TPU):
    pip install --target /tmp/libtpu libtpu==0.0.42.1
    PYTHONPATH=/tmp/libtpu TPU_WORKER_HOSTNAMES=localhost python experiments/compile_ratio.py \
        --repeats 5 --out docs/scale/compile-ratio-tpu-v5p-L2.json -- \
        --model llama-small --devices 8 --topology v5p:2x2x2 --batch 8 --seq 128 --layers 2

The arguments after ``--`` are `scale_sim.py`'s (model shape, layers, mesh, topology, remat).
Each compile runs in a fresh process with JAX's compilation cache off, and the methods alternate
within every repeat, so a slow moment of a shared machine hits both. Only the train step is
compiled (`scale_sim.compile_step`; none of scale_sim's FLOP extrapolation compiles).

Reported per method: every run's XLA compile seconds, CPU (the process's CPU time, which
neighbours disturb less) and wall, with their medians and minima; and the ratios of the first
method to the second, of the medians and of the minima. Only ratios measured side by side in
one invocation mean anything: absolute compile times vary with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(sim_args: list[str]) -> None:
    """Compile one train step and print its facts as one JSON line (run in a fresh process)."""
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    import jax
    import scale_sim

    args = scale_sim.parse_args(sim_args)
    _, info = scale_sim.compile_step(args, args.device_counts[0], jax)
    print("COMPILE_RESULT " + json.dumps(info), flush=True)


def run(method: str, sim_args: list[str]) -> dict:
    env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false")
    # A compilation cache hit would skip the very compile measured here.
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *sim_args, "--method", method]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("COMPILE_RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    info = json.loads(lines[-1].split(" ", 1)[1])
    return {k: info[k] for k in ("compile_cpu_s", "compile_s", "lower_s", "target", "layers")}


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Per method: the runs' compile seconds with medians and minima; then, for two methods,
    the first's over the second's (medians and minima, CPU and wall)."""
    out: dict = {"methods": {}}
    for method, rs in runs.items():
        rec: dict = {"repeats": len(rs), "runs": rs}
        for key in ("compile_cpu_s", "compile_s"):
            xs = [r[key] for r in rs]
            rec[f"{key}_median"] = statistics.median(xs)
            rec[f"{key}_min"] = min(xs)
        out["methods"][method] = rec
    if len(runs) == 2:
        a, b = (out["methods"][m] for m in runs)
        out["ratio"] = {
            f"{key}_{stat}": round(a[f"{key}_{stat}"] / b[f"{key}_{stat}"], 3)
            for key in ("compile_cpu_s", "compile_s")
            for stat in ("median", "min")
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1:])
        return {}
    sim_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, sim_args = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--methods", default="aroma,lora", help="comma-separated scale_sim methods (aroma,lora)"
    )
    p.add_argument("--repeats", type=int, default=3, help="processes per method, alternating (3)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if "--method" in sim_args or "--out" in sim_args:
        p.error("pass --methods and --out before --, not to scale_sim after it")
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: accepted a positive integer")
    methods = [m for m in args.methods.split(",") if m]
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for rep in range(args.repeats):
        for m in methods:
            r = run(m, sim_args)
            runs[m].append(r)
            print(
                f"repeat {rep + 1}/{args.repeats} {m:6s} [{r['target']}] L={r['layers']}: "
                f"compile {r['compile_cpu_s']:.1f} CPU s, {r['compile_s']:.1f} wall s",
                flush=True,
            )
    result = {"scale_sim_args": sim_args, **summarise(runs)}
    for m, s in result["methods"].items():
        print(
            f"{m:6s} compile CPU s median {s['compile_cpu_s_median']:.1f} min "
            f"{s['compile_cpu_s_min']:.1f}; wall s median {s['compile_s_median']:.1f} min "
            f"{s['compile_s_min']:.1f}"
        )
    if "ratio" in result:
        print(f"{methods[0]} / {methods[1]}: {result['ratio']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
