"""Where XLA:CPU spends the train step's compile: HLO passes, kernels generated, kernels reused.

    python experiments/xla_phases.py --repeats 3 --out docs/scale/xla-phases.json -- \\
        --model llama-small --devices 1 --batch 8 --seq 128 --layers 2

Runs `scale_sim.py` (the arguments after ``--``) once per method and repeat, alternating the
methods so a slow moment of a shared machine hits both, each in a fresh process with XLA's
verbose timers on (``TF_CPP_MAX_VLOG_LEVEL=1``), and reads from its log:

* ``hlo_pass_s``: the HLO optimisation passes, and the slowest passes by name;
* ``jit_s``: code generation (``Compiling ... for CPU using JIT``), wall seconds;
* ``kernels``: fused kernels XLA compiled to machine code; ``reused``: fusions that got an
  identical kernel compiled earlier in the same program (XLA:CPU deduplicates them);
* ``kernel_families``: the compiled kernels grouped by fusion name, suffixes dropped;

and from scale_sim's own result: the fusions of the optimized program (in all and per
``lax.cond`` branch) and the compile's CPU seconds.

Kernel counts are deterministic for a given program; the seconds are not (they include the
verbose logging itself, and parallel code generation shares the cores), so medians over the
repeats are reported and only ratios measured side by side mean anything.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PASS = re.compile(r"HLO pass: (\S+) time: .*?\((\d+) us\)")
KERNEL = re.compile(r"Compiled LLVM module: (\S+) time: .*?\((\d+) us\)")
STEP = r"\[jit__step_impl\]"
HLO_TOTAL = re.compile(r"Running HLO passes on " + STEP + r" for CPU time: .*?\((\d+) us\)")
JIT_TOTAL = re.compile(r"Compiling " + STEP + r" for CPU using JIT time: .*?\((\d+) us\)")


def family(kernel: str) -> str:
    """``__compute_module_and_select_fusion.3_kernel_module`` -> ``and_select_fusion``;
    ``dot.315_elemental`` -> ``dot_elemental``."""
    name = kernel.replace("__compute_module_", "").replace("_kernel_module", "")
    return re.sub(r"\.\d+(_elemental|_computation)?$", r"\1", name)


def parse(log: str) -> dict:
    """The compile phases of the train step from one process's verbose XLA log."""
    lines = log.splitlines()
    # Only the first compile of the train step: scale_sim compiles unrolled 1- and 2-layer steps
    # afterwards (for FLOPs), and small jits may compile before it.
    hlo_at = next((i for i, line in enumerate(lines) if HLO_TOTAL.search(line)), None)
    jit_at = next((i for i, line in enumerate(lines) if JIT_TOTAL.search(line)), None)
    if hlo_at is None or jit_at is None:
        raise RuntimeError(
            "no XLA compile timers for the train step in the log; is this XLA:CPU with "
            "TF_CPP_MAX_VLOG_LEVEL honoured? Last lines:\n" + "\n".join(lines[-20:])
        )
    start = max((i for i in range(hlo_at) if "for CPU using JIT time" in lines[i]), default=-1)
    passes: collections.Counter = collections.Counter()
    for line in lines[start + 1 : hlo_at]:
        m = PASS.search(line)
        if m:
            passes[m.group(1)] += int(m.group(2))
    codegen = lines[hlo_at:jit_at]
    kernels = [m.group(1) for line in codegen if (m := KERNEL.search(line))]
    return {
        "hlo_pass_s": int(HLO_TOTAL.search(lines[hlo_at]).group(1)) / 1e6,
        "jit_s": int(JIT_TOTAL.search(lines[jit_at]).group(1)) / 1e6,
        "kernels": len(kernels),
        "reused": sum("Reusing kernel" in line for line in codegen),
        "top_passes_s": {k: v / 1e6 for k, v in passes.most_common(5)},
        "kernel_families": dict(collections.Counter(family(k) for k in kernels).most_common()),
    }


def run(method: str, sim_args: list[str]) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0", TF_CPP_MAX_VLOG_LEVEL="1")
    # A compilation cache hit would skip the very compile measured here.
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sim.json"
        cmd = [sys.executable, str(HERE / "scale_sim.py"), *sim_args, "--method", method]
        proc = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        sim = json.loads(out.read_text())[0]
    return {
        **parse(proc.stdout + proc.stderr),
        "fusions": sim["fusions"],
        "compile_cpu_s": sim["compile_cpu_s"],
    }


def summarise(runs: dict[str, list[dict]]) -> dict:
    out = {}
    for method, rs in runs.items():
        out[method] = {
            "repeats": len(rs),
            "hlo_pass_s_median": statistics.median(r["hlo_pass_s"] for r in rs),
            "jit_s_median": statistics.median(r["jit_s"] for r in rs),
            "kernels": rs[0]["kernels"],
            "fusions": rs[0]["fusions"],
            "compile_cpu_s_median": statistics.median(r["compile_cpu_s"] for r in rs),
            "reused": rs[0]["reused"],
            "copy_insertion_s_median": statistics.median(
                r["top_passes_s"].get("copy-insertion", 0.0) for r in rs
            ),
            "runs": rs,
        }
    return out


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    sim_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, sim_args = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", default="aroma,lora", help="comma-separated scale_sim methods")
    p.add_argument("--repeats", type=int, default=3, help="processes per method, alternating")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if "--method" in sim_args or "--out" in sim_args:
        p.error("pass --methods and --out before --, not to scale_sim after it")
    methods = [m for m in args.methods.split(",") if m]
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for m in methods:
            runs[m].append(run(m, sim_args))
    result = {"scale_sim_args": sim_args, "methods": summarise(runs)}
    for m, s in result["methods"].items():
        print(
            f"{m:6s} HLO passes {s['hlo_pass_s_median']:.2f}s (copy-insertion "
            f"{s['copy_insertion_s_median']:.2f}s)  codegen {s['jit_s_median']:.2f}s  "
            f"kernels compiled {s['kernels']}  reused {s['reused']}  fusions "
            f"{s['fusions']['total']} (in cond branches {s['fusions']['conditional_branches']})"
            f"  compile CPU {s['compile_cpu_s_median']:.1f}s",
            flush=True,
        )
    if len(methods) == 2:
        a, b = (result["methods"][m] for m in methods)
        fa, fb = a["runs"][0]["kernel_families"], b["runs"][0]["kernel_families"]
        extra = {k: fa.get(k, 0) - fb.get(k, 0) for k in set(fa) | set(fb)}
        extra = dict(sorted(((k, v) for k, v in extra.items() if v), key=lambda kv: -kv[1]))
        result["kernel_families_difference"] = extra
        print(f"kernels {methods[0]} minus {methods[1]} by family: {extra}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
