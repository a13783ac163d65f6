"""Where XLA's TPU compiler spends a train step's compile, kernel by kernel (libtpu's LLO dumps).

    pip install --target /tmp/libtpu libtpu==0.0.42.1
    PYTHONPATH=/tmp/libtpu TPU_WORKER_HOSTNAMES=localhost python experiments/tpu_llo_kernels.py \\
        --ablation outer-step-alone --out docs/scale/tpu-llo-kernels-outer-alone-L32.json -- \\
        --model llama-small --devices 8 --topology v5p:2x2x2 --batch 8 --seq 128 --layers 32

Compiles one step (`compile_ablation.run`: the full step of ``--method`` with ``--ablation
none``, or one of its ablations; a fresh process, no compilation cache) with libtpu's
low-level dumps on (``LIBTPU_INIT_ARGS=--xla_jf_dump_to=DIR``), then
reads the dump. libtpu writes, for every kernel it generates, a file per stage of its backend
named ``<start ns>-<kernel>-<stage>-<what>.txt``. Reported per kernel:

* ``llo_bytes``: the size of its first LLO listing (``original``), a deterministic measure of
  how much code the backend starts from: an elementwise fusion over a buffer that fits the
  chip's vector memory is emitted as straight-line code, so it grows with the buffer;
* ``operands``: its operand shapes and memory spaces, read from that listing;
* ``approx_s``: from its start to the next kernel's start (the file names' timestamps); an
  approximation where the compiler works on two kernels at once.

The dump itself (hundreds of MB) goes to a temporary directory and is deleted; ``--keep DIR``
keeps it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import compile_ablation  # noqa: E402  (beside this script; no jax at module level)
import compile_ratio  # noqa: E402

DUMP_FILE = re.compile(r"^(\d{10,})-(.+)-(\d\d)-([^/]+)\.txt$")
OPERAND = re.compile(r"inlined_call_operand\.(.+?) \[shape: ([a-z0-9]+\[[^\]]*\])")


def parse_dump(root: Path) -> dict:
    """Per kernel: start time, first LLO listing's size and operands; sorted by ``approx_s``."""
    starts: dict[str, int] = {}
    original: dict[str, Path] = {}
    for f in os.listdir(root):
        m = DUMP_FILE.match(f)
        if not m:
            continue
        t, kernel, what = int(m.group(1)), m.group(2), m.group(4)
        starts[kernel] = min(t, starts.get(kernel, t))
        if what == "original":
            original[kernel] = root / f
    order = sorted(starts, key=starts.get)
    kernels = []
    for i, k in enumerate(order):
        nxt = starts[order[i + 1]] if i + 1 < len(order) else None
        listing = original.get(k)
        text = listing.read_text(errors="replace") if listing else ""
        kernels.append(
            {
                "name": k,
                "llo_bytes": len(text.encode()),
                "operands": [f"{space} {shape}" for space, shape in OPERAND.findall(text)],
                "approx_s": None if nxt is None else round((nxt - starts[k]) / 1e9, 3),
            }
        )
    kernels.sort(key=lambda r: -(r["approx_s"] or 0.0))
    span = (starts[order[-1]] - starts[order[0]]) / 1e9 if order else 0.0
    return {
        "kernels": kernels,
        "total_llo_bytes": sum(r["llo_bytes"] for r in kernels),
        "span_s": round(span, 3),
    }


def compile_with_dump(ablation: str, method: str, sim_args: list[str], dump: Path) -> dict:
    """One compile (`compile_ablation.run`) with libtpu's dumps in ``dump``; its result."""
    flags = os.environ.get("LIBTPU_INIT_ARGS", "")
    dump_flag = {"LIBTPU_INIT_ARGS": f"{flags} --xla_jf_dump_to={dump}".strip()}
    result = compile_ablation.run(ablation, method, sim_args, env_extra=dump_flag)
    if "TPU" not in str(result.get("target")):
        raise SystemExit(
            "tpu_llo_kernels.py reads libtpu's dumps: give a TPU --topology after '--' and put "
            "libtpu on PYTHONPATH (see this script's --help)"
        )
    return result


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ours, sim_args = compile_ratio.split_sim_args(argv)
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ablation", default="none", help="compile_ablation.py's, or none (default)")
    p.add_argument("--method", default="aroma", help="scale_sim's method (default: aroma)")
    p.add_argument("--top", type=int, default=15, help="kernels printed (all are in --out)")
    p.add_argument("--out", type=Path, help="write the JSON here")
    p.add_argument("--keep", type=Path, help="keep the dump in this directory")
    args = p.parse_args(ours)
    if not sim_args:
        p.error("give scale_sim.py's arguments after '--' (model, layers, --topology ...)")
    compile_ratio.check_compile_args(p, 1, sim_args)
    known = ("none", *compile_ablation.ABLATIONS)
    unknown = [a for a in args.ablation.split("+") if a not in known]
    if unknown:
        p.error(f"--ablation: unknown {unknown}; accepted: {', '.join(known)} ('a+b': both)")
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        dump, tmp = args.keep, None
    else:
        tmp = tempfile.TemporaryDirectory(prefix="llo-")
        dump = Path(tmp.name)
    try:
        compiled = compile_with_dump(args.ablation, args.method, sim_args, dump)
        result = {
            "scale_sim_args": sim_args,
            "method": args.method,
            "ablation": args.ablation,
            "compile": compiled,
        }
        result.update(parse_dump(dump))
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(
        f"{args.method}, ablation {args.ablation}: compile {compiled['compile_cpu_s']} CPU s; "
        f"{len(result['kernels'])} kernels, {result['total_llo_bytes'] / 1e6:.1f} MB of LLO, "
        f"{result['span_s']} s from the first to the last"
    )
    for k in result["kernels"][: args.top]:
        took = "      ?" if k["approx_s"] is None else f"{k['approx_s']:7.3f}"
        print(f"{took} s {k['llo_bytes'] / 1e3:8.0f} kB  {k['name']}: {k['operands'][:4]}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
