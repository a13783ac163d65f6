"""Scale by simulation: the AROMA train step of a LLaMA-3 model, compiled for meshes of simulated
devices from abstract shapes (no weights are ever created).

    python -m experiments.scale_sim --model llama3-8b --devices 1,8,64 --out scale.json
    python -m experiments.scale_sim --model llama3-70b --devices 64
    python -m experiments.scale_sim --model gemma3-4b --devices 1,8 --remat full  # or qwen3-8b
    python -m experiments.scale_sim --devices 1 --remat full --grad-accum 4 --skip-flops

For each device count the step (bf16 base weights, fp32 adapters and optimizer state, AROMA
r=1 on the paper's LLaMA targets) is traced with `jax.ShapeDtypeStruct` inputs, sharded with the
native model's logical-axis rules, AOT-lowered and compiled for that many simulated CPU devices
(``--xla_force_host_platform_device_count``, set before jax is imported). Reported per mesh:

* XLA's memory analysis of the compiled step, per device: argument, output, alias (donated
  state reused for the output) and temp bytes; their peak ``argument + output - alias + temp``;
* the collectives in the optimized HLO, per kind: how many, and the bytes of their results per
  device; those inside conditional branches (the controller's outer step and inner check, which
  run on a few steps only) are counted apart from those every step runs;
* FLOPs per step from XLA's cost analysis (per device; times the device count for the total).

XLA:CPU is not the GPU/TPU compiler: fusion and scheduling differ (temp bytes are indicative,
within tens of percent), and attention goes through XLA's reference path (it materialises the
``(batch, heads, seq, seq)`` scores) where a GPU would use cuDNN flash attention.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path

from experiments.shapes import SHAPES, of_arch

# Table 13 (LLaMA-3-8B on Commonsense170K, AROMA r=1): batch 32, max sequence length 256.
TABLE13 = dict(batch=32, seq=256)
DEFAULT_MESHES = {1: "", 8: "fsdp=8", 64: "fsdp=16,tensor=4"}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
}
GB = 1e9


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model",
        choices=of_arch("llama", "qwen3", "gemma3_text"),
        default="llama3-8b",
        help="model shape",
    )
    p.add_argument(
        "--devices", default="1,8,64", help="comma-separated simulated device counts (1,8,64)"
    )
    p.add_argument(
        "--mesh",
        action="append",
        default=[],
        metavar="N=SPEC",
        help="mesh for N devices, e.g. 64=fsdp=64 (default: 1 none, 8 fsdp=8, 64 fsdp=16,tensor=4)",
    )
    p.add_argument("--batch", type=int, default=TABLE13["batch"], help="global batch (Table 13)")
    p.add_argument("--seq", type=int, default=TABLE13["seq"], help="sequence length (Table 13)")
    p.add_argument("--layers", type=int, default=None, help="override the layer count")
    p.add_argument(
        "--grad-accum",
        type=int,
        default=1,
        metavar="K",
        help="micro-batches per optimizer step (train.grad_accum): the global --batch is "
        "summed in K micro-batches of batch/K under lax.scan inside the step",
    )
    p.add_argument(
        "--scan",
        choices=("on", "off"),
        default="on",
        help="layers under nn.scan with stacked adapters (on, the default for native models) or "
        "unrolled (off)",
    )
    p.add_argument(
        "--remat", choices=("none", "full", "dots"), default="none", help="per-layer remat"
    )
    p.add_argument(
        "--rank-capacity", type=int, default=32, help="frozen slots per module (aroma rank cap)"
    )
    p.add_argument(
        "--method",
        choices=("aroma", "lora"),
        default="aroma",
        help="aroma (controller in the step) or lora (same adapters, no controller)",
    )
    p.add_argument(
        "--topology",
        default=None,
        metavar="NAME",
        help="compile for a TPU topology instead of simulated CPU devices, e.g. v5p:2x2x2 (8 "
        "chips); needs libtpu (pip install libtpu), no TPU: XLA's TPU compiler runs on the host. "
        "--devices is then the topology's chip count",
    )
    p.add_argument(
        "--activations",
        choices=("pinned", "free"),
        default="pinned",
        help="pinned (the default): trace the step under the native model's activation rules, "
        "so its with_logical_constraint calls keep activations batch-sharded; free: no "
        "constraints, XLA's partitioner propagates the weights' shardings into the activations",
    )
    p.add_argument(
        "--hlo-dir", type=Path, default=None, help="write each compiled step's optimized HLO here"
    )
    p.add_argument(
        "--skip-flops",
        action="store_true",
        help="skip the unrolled 1- and 2-layer compiles a scanned step's FLOPs come from "
        "(flops_per_device is then NaN; flops_scan_body_once counts the layer loop once)",
    )
    p.add_argument(
        "--from-hlo",
        type=Path,
        default=None,
        metavar="FILE",
        help="compile nothing: parse an optimized HLO text (as --hlo-dir writes) for its "
        "collectives and traffic, with --batch, --seq and --devices describing its step",
    )
    p.add_argument(
        "--loop-scale",
        type=int,
        default=1,
        help="with --from-hlo: multiply the collectives that run more than once per step (the "
        "layer loops' bodies) by this, e.g. 16 to read a 2-layer compile as 32 layers",
    )
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    try:
        args.device_counts = [int(x) for x in args.devices.split(",") if x.strip()]
    except ValueError:
        p.error(f"--devices {args.devices!r}: accepted comma-separated integers, e.g. 1,8,64")
    if not args.device_counts or min(args.device_counts) < 1:
        p.error(f"--devices {args.devices!r}: accepted positive integers")
    if args.grad_accum < 1 or args.batch % args.grad_accum:
        p.error(f"--grad-accum {args.grad_accum}: accepted a positive divisor of --batch")
    args.meshes = dict(DEFAULT_MESHES)
    for m in args.mesh:
        n, _, spec = m.partition("=")
        if not n.isdigit():
            p.error(f"--mesh {m!r}: accepted N=SPEC, e.g. 64=fsdp=16,tensor=4")
        args.meshes[int(n)] = spec
    missing = [n for n in args.device_counts if n > 1 and n not in args.meshes]
    if missing:
        p.error(f"no mesh for {missing} devices: pass --mesh N=SPEC")
    return args


def _shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string: ``f32[4,8]{1,0}`` or a tuple ``(f32[2], bf16[3,4])``."""
    total = 0
    for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape):
        if dt not in DTYPE_BYTES:
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * DTYPE_BYTES[dt]
    return total


def _trip_count(line: str, comps: dict[str, list[str]]) -> int | None:
    """A ``while``'s trip count: XLA's ``known_trip_count`` backend config when present, else
    from its condition, a compare of the induction variable (a tuple element of the loop
    state) against a constant: ``i < N`` or ``N > i`` from an initial ``i`` of 0 (scan's
    loops count from 0; XLA's TPU pipeline leaves the config off its loops). None if neither
    is found."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    if known:
        return int(known.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", line)
    if not cond or cond.group(1) not in comps:
        return None
    consts: dict[str, int] = {}
    for body_line in comps[cond.group(1)]:
        c = re.match(r"\s*%?([\w.\-]+) = s(?:32|64)\[\]\S* constant\((-?\d+)\)", body_line)
        if c:
            consts[c.group(1)] = int(c.group(2))
    for body_line in comps[cond.group(1)]:
        cmp = re.search(
            r"compare\([^%]*%([\w.\-]+), [^%]*%([\w.\-]+)\), direction=(LT|GT)", body_line
        )
        if not cmp:
            continue
        a, b, direction = cmp.groups()
        bound = consts.get(b) if direction == "LT" else consts.get(a)
        if bound is not None:
            return bound
    return None


_CALLEE = re.compile(
    r"(?:body|condition|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)"
    r"|branch_computations=\{([^}]*)\}"
)


def _callees(line: str) -> list[str]:
    out = []
    for m in _CALLEE.finditer(line):
        names = [m.group(1)] if m.group(1) else m.group(2).split(",")
        out += [n.strip().lstrip("%") for n in names]
    return out


def run_counts(hlo: str) -> dict[str, tuple[int, int]]:
    """Per computation reachable from the entry: how many times it runs per step outside any
    ``conditional`` and how many times at most inside one (the controller's branches, which run
    on a few steps only). A ``while`` body and condition run once per trip (`_trip_count`; a
    loop whose count is not found counts once), nested loops multiply, and a computation called
    from several places adds their counts up."""
    comps, entry = computations(hlo)
    counts: dict[str, list[int]] = {}

    def visit(name: str, n: int, in_branch: bool) -> None:
        counts.setdefault(name, [0, 0])[int(in_branch)] += n
        for line in comps.get(name, []):
            callees = [c for c in _callees(line) if c in comps]
            if not callees:
                continue
            trips = (_trip_count(line, comps) or 1) if re.search(r"\swhile\(", line) else 1
            branch = in_branch or " conditional(" in line
            for c in callees:
                visit(c, n * trips, branch)

    if entry:
        visit(entry, 1, False)
    return {k: (v[0], v[1]) for k, v in counts.items()}


def collectives(hlo: str, detail: bool = False) -> dict:
    """Per kind: how many run per step and their result bytes per step, split into every-step
    and conditional-branch ones; a collective in a loop body counts once per iteration
    (`run_counts`). ``detail``: also ``"ops"``, one row per collective instruction and where it
    runs (its computation, result shape, runs per step, bytes per step), largest first."""
    runs = run_counts(hlo)
    comps, _ = computations(hlo)
    out: dict = {"every_step": {}, "conditional": {}}
    ops = []
    op_re = re.compile(
        r"%?([\w.\-]+) = (\([^=]*?\)|[a-z]+\d*\[[\d,]*\]\S*)\s+("
        + "|".join(COLLECTIVES)
        + r")(-start|-done)?\("
    )
    for name, lines in comps.items():
        for line in lines:
            m = op_re.search(line)
            # an async pair counts once, at its done, whose result is the collective's (the
            # start's is a tuple that also holds the operand)
            if not m or m.group(4) == "-start" and f"{m.group(3)}-done(" in hlo:
                continue
            size = _shape_bytes(m.group(2))
            for where, n in zip(("every_step", "conditional"), runs.get(name, (0, 0)), strict=True):
                if n == 0:
                    continue
                rec = out[where].setdefault(m.group(3), {"count": 0, "bytes": 0})
                rec["count"] += n
                rec["bytes"] += n * size
                ops.append(
                    {
                        "op": m.group(1),
                        "kind": m.group(3),
                        "computation": name,
                        "where": where,
                        "shape": m.group(2),
                        "runs": n,
                        "bytes": n * size,
                    }
                )
    if detail:
        out["ops"] = sorted(ops, key=lambda o: -o["bytes"])
    return out


def traffic(ops: list[dict], batch: int, seq: int, n_devices: int) -> dict[str, dict]:
    """Every-step collectives (`collectives`'s ``ops``) grouped by kind and by what they move:
    ``activations`` (a shape holding the global or per-device batch next to the sequence
    length), else ``weights`` (bf16: the frozen base model) or ``adapter/optimizer state``
    (f32), else ``other``. Keys ``"<kind>: <tensor>"``; runs and result bytes per step."""
    rows = {batch, max(batch // n_devices, 1)}
    out: dict[str, dict] = {}
    for o in ops:
        if o["where"] != "every_step":
            continue
        dims = [
            [int(d) for d in x.split(",") if d] for x in re.findall(r"\[([\d,]*)\]", o["shape"])
        ]
        if any(a in rows and b == seq for d in dims for a, b in zip(d, d[1:], strict=False)):
            tensor = "activations"
        elif o["shape"].lstrip("(").startswith("bf16"):
            tensor = "weights"
        elif o["shape"].lstrip("(").startswith("f32"):
            tensor = "adapter/optimizer state"
        else:
            tensor = "other"
        rec = out.setdefault(f"{o['kind']}: {tensor}", {"count": 0, "bytes": 0})
        rec["count"] += o["runs"]
        rec["bytes"] += o["bytes"]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["bytes"]))


def computations(hlo: str) -> tuple[dict[str, list[str]], str | None]:
    """An HLO module's text as computation name -> its lines, and the entry's name."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" "):
            current = head.group(2)
            comps[current] = []
            entry = current if head.group(1) else entry
        elif current is not None:
            comps[current].append(line)
    return comps, entry


def conditional_branches(comps: dict[str, list[str]]) -> list[list[str]]:
    """Per ``conditional`` instruction (a ``lax.cond``), the names of its branch computations."""
    out = []
    for lines in comps.values():
        for line in lines:
            m = re.search(r"branch_computations=\{([^}]*)\}", line)
            if m and " conditional(" in line:
                out.append([n.strip().lstrip("%") for n in m.group(1).split(",")])
    return out


def fusions(hlo: str) -> dict:
    """Fusion instructions of the optimized program (each one a kernel XLA emits): in all, in
    each ``lax.cond`` branch (the controller's inner check and outer step) and in each
    ``while`` body outside the branches (a scanned layer stack's forward and backward loops),
    nested loops and calls included, fused computations' insides not."""
    comps, entry = computations(hlo)
    callee = re.compile(
        r"(?:body|condition|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
        r"|branch_computations=\{([^}]*)\}"
    )

    def called(line: str) -> list[str]:
        out = []
        for m in callee.finditer(line):
            names = [m.group(1)] if m.group(1) else m.group(2).split(",")
            out += [n.strip().lstrip("%") for n in names if n.strip().lstrip("%") in comps]
        return out

    def count(name: str) -> int:
        total = 0
        for line in comps[name]:
            if re.search(r"\sfusion\(", line):
                total += 1
            else:
                total += sum(count(c) for c in called(line))
        return total

    branches = [[count(n) for n in names] for names in conditional_branches(comps)]
    loops: list[int] = []

    def find_loops(name: str) -> None:  # from the entry, not descending into branches
        for line in comps[name]:
            if " conditional(" in line or re.search(r"\sfusion\(", line):
                continue
            body = re.search(r"\swhile\(.*body=%?([\w.\-]+)", line)
            if body and body.group(1) in comps:
                loops.append(count(body.group(1)))
                continue
            for c in called(line):
                find_loops(c)

    if entry:
        find_loops(entry)
    return {
        "total": count(entry) if entry else 0,
        "conditional_branches": branches,
        "loop_bodies": loops,
    }


def _devices(args, n_devices: int, jax) -> list:
    if args.topology is None:
        return jax.devices()[:n_devices]
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name=args.topology, platform="tpu").devices
    if len(devices) != n_devices:
        raise SystemExit(
            f"--topology {args.topology} has {len(devices)} chips; pass --devices {len(devices)}"
        )
    return list(devices)


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    return cost[0] if isinstance(cost, list) else cost


def _with(args: argparse.Namespace, **changes) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


def unrolled_flops(args, n_devices: int, jax, layers: int) -> float:
    """FLOPs per device of the step with ``layers`` layers, extrapolated from the unrolled step
    with 1 and 2 layers: XLA's cost analysis counts a ``while`` body (the scanned layer) once,
    not once per iteration, so the scanned step's own figure misses ``L - 1`` layers."""
    one, two = (
        _cost(compile_step(_with(args, layers=n, scan="off"), n_devices, jax)[0])["flops"]
        for n in (1, 2)
    )
    return float(one + (layers - 1) * (two - one))


def simulate(args, n_devices: int, jax) -> dict:
    compiled, info = compile_step(args, n_devices, jax)
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    if args.hlo_dir:
        args.hlo_dir.mkdir(parents=True, exist_ok=True)
        name = f"{args.model}-L{info['layers']}-{n_devices}-{args.remat}-{args.activations}"
        (args.hlo_dir / f"{name}.hlo.txt").write_text(hlo)
    flops = float(_cost(compiled).get("flops", float("nan")))
    if info["scan_layers"]:
        info["flops_scan_body_once"] = flops
        # NaN, not the loop-body-once figure, when the extra unrolled compiles are skipped
        flops = (
            float("nan")
            if args.skip_flops
            else unrolled_flops(args, n_devices, jax, info["layers"])
        )
    coll = collectives(hlo, detail=True)
    peak = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )
    return {
        **info,
        "argument_bytes": mem.argument_size_in_bytes,
        "output_bytes": mem.output_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes,
        "peak_bytes": peak,
        "flops_per_device": flops,
        "collectives": coll,
        # the layers' collectives move one micro-batch's activations
        "traffic": traffic(coll["ops"], args.batch // args.grad_accum, args.seq, n_devices),
        "fusions": fusions(hlo),
    }


def compile_step(args, n_devices: int, jax):
    """The compiled train step and the facts about it (model, mesh, compile seconds)."""
    import jax.numpy as jnp

    from aroma_jax import AromaConfig, AromaTrainer
    from aroma_jax.core import sharding
    from aroma_jax.data import objectives
    from aroma_jax.models.hf import PRESETS
    from aroma_jax.models.native import NativeCausalLM, NativeConfig
    from aroma_jax.models.native.partitioning import activation_context, sharding_rules

    shape = dict(SHAPES[args.model][1])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    cfg = NativeConfig.from_dict({"model_type": "llama", "tie_word_embeddings": False, **shape})
    # `params={}` skips the random init: only the module and its config are needed here.
    scan = args.scan == "on"
    model = NativeCausalLM(cfg, params={}, dtype=jnp.bfloat16, remat=args.remat, scan_layers=scan)
    ids = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
    params = jax.eval_shape(
        lambda: model.module.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
    )
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16), params)
    model.params = params
    loss_fn, _ = objectives.causal_lm(model)
    aroma = AromaConfig(
        target_modules=PRESETS["llama"],
        r=1,
        alpha=2.0,
        learning_rate=1e-4,
        max_steps=100_000,
        inner_max_steps=1000,
        inner_check_every=10,
        inner_tol=0.1,
        outer_tol=1e-3,
        rank_capacity=args.rank_capacity,
        method=args.method,
    )
    stacked = {"model/layers": cfg.num_hidden_layers} if scan else None
    trainer = AromaTrainer(
        loss_fn,
        params,
        aroma,
        stacked=stacked,
        grad_accum=args.grad_accum,
        loss_weight=objectives.causal_lm_tokens,
    )
    state = jax.eval_shape(trainer.init, params)
    batch = {"input_ids": ids, "attention_mask": ids, "loss_mask": ids}
    mesh_spec = args.meshes.get(n_devices, "")
    context = contextlib.nullcontext()
    if n_devices > 1 or args.topology:  # a topology's programs need explicit shardings
        mesh = sharding.parse_mesh(mesh_spec or "data=1", _devices(args, n_devices, jax))
        shardings = sharding.state_shardings(trainer, state, mesh, sharding_rules())
        trainer.set_shardings(shardings, sharding.batch_sharding(mesh))
        if args.activations == "pinned":
            context = activation_context(mesh)
    # CPU seconds next to wall seconds: on a shared machine the wall clock measures the
    # neighbours too, the process's CPU time much less so.
    t0, c0 = time.perf_counter(), time.process_time()
    with context:  # constraints are applied while tracing, so lowering is where they matter
        lowered = trainer._step.lower(state, batch)
    t1, c1 = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    t2, c2 = time.perf_counter(), time.process_time()
    param_count = sum(int(x.size) for x in jax.tree.leaves(params))
    return compiled, {
        "model": args.model,
        "layers": cfg.num_hidden_layers,
        "params": param_count,
        "devices": n_devices,
        "mesh": mesh_spec or "single device",
        "target": f"TPU {args.topology}" if args.topology else "simulated CPU devices",
        "batch": args.batch,
        "grad_accum": args.grad_accum,
        "seq": args.seq,
        "remat": args.remat,
        "method": args.method,
        "scan_layers": scan,
        "activations": args.activations if n_devices > 1 or args.topology else "single device",
        "adapted_modules": len(trainer.paths),
        "lower_s": round(t1 - t0, 1),
        "compile_s": round(t2 - t1, 1),
        "lower_cpu_s": round(c1 - c0, 1),
        "compile_cpu_s": round(c2 - c1, 1),
    }


def fmt(r: dict) -> str:
    every = r["collectives"]["every_step"]
    cond = r["collectives"]["conditional"]
    coll = ", ".join(f"{k} x{v['count']} {v['bytes'] / GB:.2f} GB" for k, v in every.items())
    ccoll = ", ".join(f"{k} x{v['count']} {v['bytes'] / GB:.3f} GB" for k, v in cond.items())
    return (
        f"[{r['target']}] {r['model']} {r['method']} L={r['layers']} "
        f"batch {r['batch']} in {r['grad_accum']} micro-batches "
        f"on {r['devices']} ({r['mesh']}): "
        f"args {r['argument_bytes'] / GB:.2f} GB, out {r['output_bytes'] / GB:.2f} GB, "
        f"alias {r['alias_bytes'] / GB:.2f} GB, temp {r['temp_bytes'] / GB:.2f} GB, "
        f"peak {r['peak_bytes'] / GB:.2f} GB/device; "
        f"{r['flops_per_device'] / 1e12:.1f} TFLOP/device/step; "
        f"collectives every step: {coll or 'none'}; in branches: {ccoll or 'none'}; "
        f"lower {r['lower_s']}s compile {r['compile_s']}s "
        f"(CPU time: lower {r['lower_cpu_s']}s compile {r['compile_cpu_s']}s)"
    )


def from_hlo(args: argparse.Namespace) -> dict:
    """`collectives` and `traffic` of a saved optimized HLO text (``--from-hlo``)."""
    coll = collectives(args.from_hlo.read_text(), detail=True)
    k = args.loop_scale
    ops = [
        dict(o, runs=o["runs"] * k, bytes=o["bytes"] * k) if o["runs"] > 1 else o
        for o in coll["ops"]
    ]
    n = args.device_counts[0]
    return {
        "hlo": str(args.from_hlo),
        "loop_scale": k,
        "traffic": traffic(ops, args.batch, args.seq, n),
        "collectives": coll,
    }


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.from_hlo:
        r = from_hlo(args)
        for key, v in r["traffic"].items():
            print(f"{key}: x{v['count']} {v['bytes'] / GB:.2f} GB per device per step")
        if args.out:
            args.out.write_text(json.dumps([r], indent=2))
        return [r]
    flag = f"--xla_force_host_platform_device_count={max(args.device_counts)}"
    if "jax" in sys.modules:
        import jax

        if jax.device_count() < max(args.device_counts):
            raise SystemExit(
                f"jax is already imported with {jax.device_count()} devices; run scale_sim in a "
                f"fresh process (it sets {flag})"
            )
    elif args.topology is None:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    else:  # no TPU attached: libtpu's compiler only; quiet its worker discovery
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    results = []
    for n in args.device_counts:
        r = simulate(args, n, jax)
        print(fmt(r), flush=True)
        results.append(r)
        if args.out:  # after every mesh, so a slow later mesh leaves the earlier results
            args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
