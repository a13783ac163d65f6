"""AROMA's train-step compile against LoRA's, side by side, on XLA:CPU or for a TPU topology.

    python experiments/compile_ratio.py --repeats 5 --out docs/scale/compile-ratio-cpu-L2.json -- \
        --model llama-small --devices 1 --batch 8 --seq 128 --layers 2

    # the same step compiled by XLA's TPU compiler (libtpu runs on a host without a TPU):
    pip install --target /tmp/libtpu libtpu==0.0.42.1
    PYTHONPATH=/tmp/libtpu TPU_WORKER_HOSTNAMES=localhost python experiments/compile_ratio.py \
        --repeats 5 --out docs/scale/compile-ratio-tpu-v5p-L2.json -- \
        --model llama-small --devices 8 --topology v5p:2x2x2 --batch 8 --seq 128 --layers 2

    # did a change help? The same, plus the AROMA step of another checkout, alternating with both:
    git worktree add /tmp/before 0f8eff4
    python experiments/compile_ratio.py --repeats 5 --baseline /tmp/before -- \
        --model llama-small --devices 1 --batch 8 --seq 128 --layers 2

The arguments after ``--`` are `scale_sim.py`'s (model shape, layers, mesh, topology, remat).
Each compile runs in a fresh process with JAX's compilation cache off, and the methods alternate
within every repeat, so a slow moment of a shared machine hits both. Only the train step is
compiled (`scale_sim.compile_step`; none of scale_sim's FLOP extrapolation compiles).

Reported per method: every run's XLA compile seconds, CPU (the process's CPU time, which
neighbours disturb less) and wall, with their medians and minima; and the ratios of the first
method to the second, of the medians and of the minima. With ``--baseline DIR`` (a checkout of
aroma-jax whose ``experiments/scale_sim.py`` has ``compile_step``, from commit d7920e0 on: this
script runs it with that checkout's ``aroma_jax``) the first method is also compiled by that
checkout's code, as ``<method>@baseline``, in the same rotation: ``versus_baseline`` is this
tree's over the baseline's, ``baseline_ratio`` the baseline's over the second method.

Each series also reports its optimized program's size (``program``: instructions, fusions,
fusions in the outer-step branch and in the layer loops, and the Threefry hashes compiled, in
all and in the branch; `program_size`), counted by this script whichever checkout compiled
it, and ``program_ratio`` / ``program_versus_baseline``. The sizes are exact and the same in
every run, so they show what a change did where a shared machine's seconds cannot
(the same compile has varied by 2x in CPU seconds between runs on one host).

``paired_ratio`` / ``paired_versus_baseline`` divide each repeat's two compiles (run back to
back) and take the median of those ratios, with a distribution-free confidence interval for
that median (`median_interval`: at least 90% coverage, from 5 repeats on). ``--pool A.json
B.json ...`` compiles nothing: it summarises earlier results of one command as one longer run;
with ``--series aroma,lora`` it pools only those series, from this script's files and from
`compile_ablation.py`'s, and refuses runs whose program sizes differ (one program only):

    python experiments/compile_ratio.py --series aroma,lora --pool a.json ablation.json

Only ratios measured side by side in one invocation mean anything: absolute compile times vary
with the machine's load (and with the machine: a slower host measured larger ratios).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def program_size(hlo: str) -> dict:
    """The size of an optimized program, exact where the seconds are noisy: its instructions
    (inside fused computations too: what the backend generates code for), and its fusions in
    all and in its largest ``lax.cond`` branch (the outer step), as this checkout's
    `scale_sim.fusions` counts (also in a baseline's process, where ``scale_sim`` is the
    baseline's: one counter for both series)."""
    instructions = sum(
        1 for line in hlo.splitlines() if line.startswith("  ") and re.search(r"%\S+ = ", line)
    )
    fus = _counter().fusions(hlo)
    branches = fus["conditional_branches"]
    threefry = threefry_fusions(hlo)
    return {
        "instructions": instructions,
        "fusions": fus["total"],
        "outer_branch_fusions": max((max(b) for b in branches), default=0),
        "loop_body_fusions": fus["loop_bodies"],  # a scanned stack: forward, backward
        "threefry_fusions": threefry["total"],
        "outer_branch_threefry_fusions": max(threefry["branches"], default=0),
    }


THREEFRY_XORS = 16  # Threefry-2x32 hashes with 20 rounds of add-rotate-xor; nothing else has many
_CALLEES = re.compile(
    r"(?:calls|body|condition|to_apply)=%?([\w.\-]+)|branch_computations=\{([^}]*)\}"
)


def threefry_fusions(hlo: str) -> dict:
    """Fusions computing a Threefry hash (a random draw or a key split): those whose fused
    computation holds at least `THREEFRY_XORS` ``xor`` instructions. ``total``: in the whole
    program; ``branches``: in each ``lax.cond`` branch. XLA can inline one draw into each of
    its consumers, so this counts the copies actually compiled. The TPU compiler emits the hash
    as fusions; XLA:CPU runs its rounds as a loop, whose fusions hold a few ``xor`` each, so
    its programs count 0."""
    sim = _counter()
    comps, entry = sim.computations(hlo)

    def callees(line: str) -> list[str]:
        out = []
        for m in _CALLEES.finditer(line):
            names = [m.group(1)] if m.group(1) else m.group(2).split(",")
            out += [n.strip().lstrip("%") for n in names if n.strip().lstrip("%") in comps]
        return out

    xors: dict[str, int] = {}

    def xor_count(name: str) -> int:  # in a computation and everything it calls
        if name not in xors:
            xors[name] = sum(
                (" xor(" in line) + sum(xor_count(c) for c in callees(line)) for line in comps[name]
            )
        return xors[name]

    def hashing(name: str) -> int:  # hashing fusions in a computation, through loops and calls
        total = 0
        for line in comps[name]:
            if re.search(r"\sfusion\(", line):
                total += any(xor_count(c) >= THREEFRY_XORS for c in callees(line))
            else:
                total += sum(hashing(c) for c in callees(line))
        return total

    branches = [hashing(n) for names in sim.conditional_branches(comps) for n in names]
    return {"total": hashing(entry) if entry else 0, "branches": branches}


def _counter():
    """This checkout's ``scale_sim``, loaded under its own name (it imports no jax and no
    aroma_jax at module level, so loading it beside a baseline's changes nothing there)."""
    name = "_compile_ratio_scale_sim"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "scale_sim.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules[name] = mod
    return sys.modules[name]


def child(argv: list[str]) -> None:
    """Compile one train step and print its facts as one JSON line (run in a fresh process).

    ``--code DIR`` first: that checkout's ``aroma_jax`` and ``scale_sim`` compile the step (a
    baseline); this script's `program_size` measures it either way."""
    code = HERE.parent
    if argv[:1] == ["--code"]:
        code, argv = Path(argv[1]), argv[2:]
    sys.path[:0] = [str(code / "experiments"), str(code)]
    import jax
    import scale_sim

    args = scale_sim.parse_args(argv)
    compiled, info = scale_sim.compile_step(args, args.device_counts[0], jax)
    info.update(program_size(compiled.as_text()))
    print("COMPILE_RESULT " + json.dumps(info), flush=True)


def baseline_problem(tree: Path) -> str | None:
    """Why ``tree`` cannot compile a baseline step (None when it can): `child` imports its
    ``aroma_jax`` and calls its ``scale_sim.compile_step``."""
    if not (tree / "aroma_jax" / "__init__.py").is_file():
        return "no aroma_jax package there"
    sim = tree / "experiments" / "scale_sim.py"
    if not sim.is_file():
        return "no experiments/scale_sim.py there"
    if "def compile_step(" not in sim.read_text():
        return "its experiments/scale_sim.py has no compile_step"
    return None


KEYS = ("compile_cpu_s", "compile_s", "lower_s", "target", "layers")
SIZES = (
    "instructions",
    "fusions",
    "outer_branch_fusions",
    "loop_body_fusions",
    "threefry_fusions",
    "outer_branch_threefry_fusions",
)


def run(
    method: str,
    sim_args: list[str],
    tree: Path | None = None,
    child_cmd: list[str] | None = None,
    env_extra: dict[str, str] | None = None,
) -> dict:
    """One compile in a fresh process; ``tree``: another checkout whose code compiles it;
    ``child_cmd``: the command that compiles (default: this script's ``--child``), given the
    scale_sim arguments and ``--method`` (`compile_ablation.py` passes its own);
    ``env_extra``: more environment for the child (`tpu_llo_kernels.py`'s dump flag)."""
    env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false", **(env_extra or {}))
    # A compilation cache hit would skip the very compile measured here.
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    code = []
    if tree is not None:  # that checkout's aroma_jax first on the path, and its scale_sim
        code = ["--code", str(tree)]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    script = Path(__file__).resolve()
    child_cmd = child_cmd or [sys.executable, str(script), "--child", *code]
    cmd = [*child_cmd, *sim_args, "--method", method]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("COMPILE_RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    info = json.loads(lines[-1].split(" ", 1)[1])
    return {k: info[k] for k in KEYS + SIZES if k in info}


def _ratio(a: dict, b: dict) -> dict:
    """``a``'s medians and minima (CPU and wall) over ``b``'s."""
    return {
        f"{key}_{stat}": round(a[f"{key}_{stat}"] / b[f"{key}_{stat}"], 3)
        for key in ("compile_cpu_s", "compile_s")
        for stat in ("median", "min")
    }


def series_record(name: str, rs: list[dict]) -> dict:
    """One series' runs with their compile seconds' medians and minima (CPU and wall) and its
    program's size (the same in every run, or an error)."""
    rec: dict = {"repeats": len(rs), "runs": rs}
    for key in ("compile_cpu_s", "compile_s"):
        xs = [r[key] for r in rs]
        rec[f"{key}_median"] = statistics.median(xs)
        rec[f"{key}_min"] = min(xs)
    sizes = {k: rs[0][k] for k in SIZES if k in rs[0]}
    if sizes:  # one program per series: every run compiles the same one
        if any({k: r.get(k) for k in sizes} != sizes for r in rs):
            raise RuntimeError(f"{name}: the program's size differed between runs: {rs}")
        rec["program"] = sizes
    return rec


def summarise(runs: dict[str, list[dict]], baseline: str | None = None) -> dict:
    """Per method: the runs' compile seconds with medians and minima; then, for two methods,
    the first's over the second's (medians and minima, CPU and wall). ``baseline``: the name of
    a third series (the first method compiled by another checkout), compared with both."""
    out: dict = {"methods": {}}
    for method, rs in runs.items():
        out["methods"][method] = series_record(method, rs)
    ours = [m for m in runs if m != baseline]
    if len(ours) == 2:
        a, b = (out["methods"][m] for m in ours)
        out["ratio"] = _ratio(a, b)
        out["paired_ratio"] = _paired(runs[ours[0]], runs[ours[1]])
        if "program" in a and "program" in b:
            out["program_ratio"] = _size_ratio(a["program"], b["program"])
        if baseline is not None:
            base = out["methods"][baseline]
            out["versus_baseline"] = _ratio(a, base)
            out["paired_versus_baseline"] = _paired(runs[ours[0]], runs[baseline])
            out["baseline_ratio"] = _ratio(base, b)
            if "program" in a and "program" in base:
                out["program_versus_baseline"] = _size_ratio(a["program"], base["program"])
    return out


def _paired(a: list[dict], b: list[dict]) -> dict:
    """Per repeat, ``a``'s CPU seconds over ``b``'s (the two compiled back to back, so a slow
    moment of the machine hits both), their median, and a distribution-free confidence
    interval for that median (`median_interval`; None with fewer than 5 repeats)."""
    xs = [round(x["compile_cpu_s"] / y["compile_cpu_s"], 3) for x, y in zip(a, b, strict=True)]
    ci = median_interval(xs)
    return {
        "compile_cpu_s": xs,
        "compile_cpu_s_median": round(statistics.median(xs), 3),
        "compile_cpu_s_median_ci": ci,
    }


def median_interval(xs: list[float], level: float = 0.9) -> dict | None:
    """The narrowest order-statistic interval ``[x_(k), x_(n+1-k)]`` that covers the median of
    the distribution ``xs`` were drawn from with probability at least ``level``, assuming only
    independent draws: the median lies below ``x_(k)`` only if at most ``k - 1`` of ``n`` draws
    fall below it, so the coverage is ``1 - 2 P(Binomial(n, 1/2) <= k - 1)``. With the per-repeat
    ratios this says whether a target (e.g. 1.3x) is inside, below or above what a noisy machine
    measured. None when no interval reaches ``level`` (5 draws give at most 94%)."""
    n = len(xs)
    best = None
    cdf = 0.0  # P(Binomial(n, 1/2) <= k - 1)
    for k in range(1, n // 2 + 1):
        cdf += math.comb(n, k - 1) / 2**n
        coverage = 1.0 - 2.0 * cdf
        if coverage < level:
            break
        best = (k, coverage)
    if best is None:
        return None
    k, coverage = best
    ys = sorted(xs)
    return {"low": ys[k - 1], "high": ys[n - k], "coverage": round(coverage, 4), "n": n}


def pooled(paths: list[Path], series: list[str] | None = None) -> dict:
    """The runs of several result files of the same command (same scale_sim arguments and
    series), summarised as one: more repeats than one invocation's, for a noisy machine.

    ``series``: pool only these (e.g. ``["aroma", "lora"]``), which every file must hold; then
    `compile_ablation.py`'s files (their ``series``) pool with this script's (``methods``).
    Runs that record their program's size must all have compiled the same program
    (`series_record`), so files of different commits pool only where the program is the same.
    """
    results = [json.loads(Path(f).read_text()) for f in paths]
    held = [r.get("methods") or r.get("series") or {} for r in results]
    first = results[0]
    names = list(held[0]) if series is None else list(series)
    for f, r, h in zip(paths, results, held, strict=True):
        wrong_args = r.get("scale_sim_args") != first.get("scale_sim_args")
        if wrong_args or (list(h) != names if series is None else not set(names) <= set(h)):
            raise ValueError(
                f"{f}: scale_sim args {r.get('scale_sim_args')} and series {list(h)}; "
                f"accepted: the same as {paths[0]}'s ({first.get('scale_sim_args')}, "
                f"{names if series is None else 'holding ' + ', '.join(names)})"
            )
    runs = {m: [x for h in held for x in h[m]["runs"]] for m in names}
    baseline = next((m for m in runs if m.endswith("@baseline")), None)
    out = {"scale_sim_args": first["scale_sim_args"], **summarise(runs, baseline)}
    out["pooled"] = [str(f) for f in paths]
    return out


def _size_ratio(a: dict, b: dict) -> dict:
    """``a``'s program sizes over ``b``'s (zero over zero is 1; anything else over zero, None)."""
    keys = [k for k in a if k in b and isinstance(a[k], int)]
    return {k: round(a[k] / b[k], 3) if b[k] else (None if a[k] else 1.0) for k in keys}


def split_sim_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(the arguments before "--", scale_sim's arguments after it)``."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def parser(
    argv: list[str], description: str, per: str
) -> tuple[argparse.ArgumentParser, list[str], list[str]]:
    """What this script and `compile_ablation.py` parse alike: ``(parser with --repeats and
    --out, the arguments before ``--``, scale_sim's arguments after it)``; ``per``: what one
    repeat compiles once ("method", "series")."""
    argv, sim_args = split_sim_args(argv)
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=3, help=f"processes per {per}, alternating (3)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p, argv, sim_args


def check_compile_args(p: argparse.ArgumentParser, repeats: int, sim_args: list[str]) -> None:
    """``--repeats`` positive, and no ``--method`` or ``--out`` for scale_sim (the series fix
    the method; ``--out`` belongs before ``--``)."""
    if "--method" in sim_args or "--out" in sim_args:
        p.error("pass --out before --, and no --method after it: the series fix the method")
    if repeats < 1:
        p.error(f"--repeats {repeats}: accepted a positive integer")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1:])
        return {}
    p, argv, sim_args = parser(argv, __doc__, "method")
    p.add_argument(
        "--methods", default="aroma,lora", help="comma-separated scale_sim methods (aroma,lora)"
    )
    p.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="another checkout (e.g. a git worktree of an older commit): its code compiles the "
        "first method too, in the same rotation, as <method>@baseline",
    )
    p.add_argument(
        "--pool",
        type=Path,
        nargs="+",
        default=None,
        help="compile nothing: summarise these earlier --out files of one command as one run",
    )
    p.add_argument(
        "--series",
        default=None,
        help="with --pool: pool only these comma-separated series, which every file must hold "
        "(e.g. aroma,lora: then compile_ablation.py's files pool too); runs that recorded "
        "their program's size must all have compiled the same program",
    )
    args = p.parse_args(argv)
    if args.series and not args.pool:
        p.error("--series selects what --pool pools; pass --pool too")
    if args.pool:
        if sim_args:
            p.error("--pool reads the scale_sim arguments from its files; pass none after --")
        try:
            series = args.series.split(",") if args.series else None
            result = pooled(args.pool, series)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            p.error(f"--pool: {e}")
        ours = [m for m in result["methods"] if not m.endswith("@baseline")]
        return _report(
            result, ours, next((m for m in result["methods"] if m not in ours), None), args.out
        )
    check_compile_args(p, args.repeats, sim_args)
    methods = [m for m in args.methods.split(",") if m]
    series = {m: (m, None) for m in methods}  # name -> (method, checkout)
    baseline = None
    if args.baseline is not None:
        tree = args.baseline.resolve()
        problem = baseline_problem(tree)
        if problem:
            p.error(
                f"--baseline {args.baseline}: {problem}; accepted: a checkout of aroma-jax from "
                "commit d7920e0 on (its aroma_jax package and its experiments/scale_sim.py with "
                "compile_step, which this script runs)"
            )
        baseline = f"{methods[0]}@baseline"
        series[baseline] = (methods[0], tree)
    runs: dict[str, list[dict]] = {m: [] for m in series}
    for rep in range(args.repeats):
        for m, (method, tree) in series.items():
            r = run(method, sim_args, tree)
            runs[m].append(r)
            print(
                f"repeat {rep + 1}/{args.repeats} {m:14s} [{r['target']}] L={r['layers']}: "
                f"compile {r['compile_cpu_s']:.1f} CPU s, {r['compile_s']:.1f} wall s",
                flush=True,
            )
    result = {"scale_sim_args": sim_args, **summarise(runs, baseline)}
    if baseline is not None:
        result["baseline"] = str(args.baseline)
    return _report(result, methods, baseline, args.out)


def _report(result: dict, methods: list[str], baseline: str | None, out: Path | None) -> dict:
    """Print the summary; write it to ``out`` as JSON."""
    for m, s in result["methods"].items():
        print(
            f"{m:14s} compile CPU s median {s['compile_cpu_s_median']:.1f} min "
            f"{s['compile_cpu_s_min']:.1f}; wall s median {s['compile_s_median']:.1f} min "
            f"{s['compile_s_min']:.1f}"
        )
    if "ratio" in result:
        print(f"{methods[0]} / {methods[1]}: {result['ratio']}")
        print(f"{methods[0]} / {methods[1]}, per repeat: {result['paired_ratio']}")
    if "program_ratio" in result:
        print(f"{methods[0]} / {methods[1]}, program size: {result['program_ratio']}")
    if "versus_baseline" in result:
        print(f"{methods[0]} / {baseline}: {result['versus_baseline']}")
        print(f"{methods[0]} / {baseline}, per repeat: {result['paired_versus_baseline']}")
        print(f"{baseline} / {methods[1]}: {result['baseline_ratio']}")
    if "program_versus_baseline" in result:
        print(f"{methods[0]} / {baseline}, program size: {result['program_versus_baseline']}")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
