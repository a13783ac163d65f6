"""Every number of short AROMA runs, saved; two saves compared bit for bit.

For a change meant to leave training unchanged (a compile-time rewrite, a new layout): run the
same short runs with this checkout's code and with another's, then compare every leaf.

    git worktree add /tmp/before f8125a8
    python -m experiments.trace_run --out /tmp/now.npz
    python -m experiments.trace_run --code /tmp/before --out /tmp/before.npz
    python -m experiments.trace_run --compare /tmp/now.npz /tmp/before.npz

The runs: a tiny LLaMA (native model, 2 layers, GQA) on a copy task, AROMA r=1 with short inner
loops so that several outer steps merge and re-initialise within ``--steps``, and, late in the
60-step default, stop some modules by eq. 6 (the done modules' masking then runs too); one run per
configuration in ``--configs``: layers scanned (stacked adapters) or unrolled, fp32 kernels
(folded) or bf16 (frozen factors applied), ``prune`` or ``full`` optimizer resets; AROMA with
``none`` (no reset); and LoRA, ReLoRA, DoRA, AdaLoRA (a budget pruning from 4 to 2 triplets) and
head-only (``lm_head`` trained), each scanned in fp32 and unrolled in bf16 (``lora-scan-fp32``).

Saved per run: every step's loss, ``rho_in``, ``rho_out``, ranks and outer/merged flags, and every
leaf of the final train state (base params with folded kernels, adapters, optimizer state,
controller state with its PRNG key). bf16 leaves are saved as float32 (exactly) and keys as
their raw data. ``--compare`` requires the same leaves with the same shape, dtype and bytes (NaN
included), prints every leaf that differs with its largest difference, and exits 1 if any does.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CONFIGS = [
    f"{layers}-{dtype}-{reset}"
    for layers, dtype, reset in itertools.product(
        ("scan", "unrolled"), ("fp32", "bf16"), ("prune", "full")
    )
]
# AROMA without resets and the other methods, each scanned in fp32 and unrolled in bf16.
OTHERS = ("lora", "relora", "dora", "adalora", "head")
CONFIGS += ["scan-fp32-none", "unrolled-bf16-none"]
CONFIGS += [f"{m}-{layers}" for m in OTHERS for layers in ("scan-fp32", "unrolled-bf16")]
METHOD_KNOBS = {  # short-run settings under which each method's own machinery runs
    "lora": dict(r=2, alpha=4.0),
    "relora": dict(),
    "dora": dict(),
    "adalora": dict(init_r=4, target_r=2, tinit=5, tfinal=10, delta_t=5),
    "head": dict(train_patterns=("lm_head",)),
}
MODEL = dict(
    model_type="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    tie_word_embeddings=False,
)
_RERUN = "AROMA_TRACE_RUN_CODE"  # set in the re-run process: the checkout it must import
STEP_FIELDS = ("loss", "rho_in", "rho_out", "ranks", "outer", "merged", "newly_done")


def batches(n: int):
    """Two copy-task batches in turn (learnable, so the adapters move and ranks grow)."""
    for i in range(n):
        rng = np.random.default_rng(i % 2)
        ids = rng.integers(3, 64, (4, 16)).astype(np.int32)
        ids[:, 8:] = ids[:, :8]
        loss_mask = np.zeros_like(ids)
        loss_mask[:, 8:] = 1
        yield {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask}


def _plain(x) -> np.ndarray:
    """A leaf as a savable array: bf16 widened exactly to float32, PRNG keys as their data."""
    import jax
    import jax.numpy as jnp

    if jnp.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = np.asarray(jax.device_get(x))
    if x.dtype == jnp.bfloat16:
        x = x.astype(np.float32)
    return x


def trace(name: str, steps: int) -> dict[str, np.ndarray]:
    """One run (configuration ``name``): its per-step records and final state, by leaf path."""
    import jax
    import jax.numpy as jnp

    from aroma_jax import AromaConfig, AromaTrainer
    from aroma_jax.data import objectives
    from aroma_jax.models.hf import PRESETS
    from aroma_jax.models.native import NativeCausalLM, NativeConfig

    method, rest = name.split("-", 1) if name.split("-")[0] in OTHERS else ("aroma", name)
    layers, dtype, *reset = rest.split("-")
    reset = reset[0] if reset else "prune"
    scan = layers == "scan"
    cfg = NativeConfig.from_dict(MODEL)
    model = NativeCausalLM(cfg, seed=0, scan_layers=scan)
    if dtype == "bf16":
        model.params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), model.params)
    loss_fn, _ = objectives.causal_lm(model)
    knobs = dict(
        target_modules=PRESETS["llama"],
        r=1,
        alpha=2.0,
        learning_rate=2e-2,
        max_steps=steps,
        inner_max_steps=5,
        inner_check_every=3,
        outer_tol=0.08,  # rho_out falls below it late in the run: some modules stop, some merge
        warmup_steps=2,
        rewarmup_steps=2,
        reset=reset,
    )
    if method != "aroma":
        knobs.update(method=method, **METHOD_KNOBS[method])
    aroma = AromaConfig(**knobs)
    stacked = {"model/layers": cfg.num_hidden_layers} if scan else None
    trainer = AromaTrainer(loss_fn, model.params, aroma, donate=False, stacked=stacked)
    state = trainer.init(model.params)
    records: dict[str, list] = {f: [] for f in STEP_FIELDS}
    for batch in batches(steps):
        state, info = trainer.step(state, batch)
        for f in STEP_FIELDS:
            records[f].append(_plain(getattr(info, f)))
    out = {f"{name}/steps/{f}": np.stack(xs) for f, xs in records.items()}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        out[f"{name}/state{jax.tree_util.keystr(path)}"] = _plain(leaf)
    return out


def compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[str]:
    """Every difference between two saves, one line each (empty: bit-identical)."""
    problems = [f"{k}: only in the first" for k in sorted(set(a) - set(b))]
    problems += [f"{k}: only in the second" for k in sorted(set(b) - set(a))]
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            problems.append(f"{k}: {x.dtype}{list(x.shape)} against {y.dtype}{list(y.shape)}")
        elif x.tobytes() != y.tobytes():
            diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
            problems.append(f"{k}: differs, largest difference {np.nanmax(diff, initial=0):.3g}")
    return problems


def _imported_from(code: Path) -> Path | None:
    """``code``'s aroma_jax package if it is the one ``import aroma_jax`` would load here."""
    spec = importlib.util.find_spec("aroma_jax")
    origin = Path(spec.origin).resolve() if spec and spec.origin else None
    return origin.parent if origin == code / "aroma_jax" / "__init__.py" else None


def _rerun_with(code: Path, argv: list[str]) -> int:
    """This script again, in a process whose ``PYTHONPATH`` puts ``code`` first (once: a second
    mismatch means the path did not take effect, which is an error, not a loop)."""
    if os.environ.get(_RERUN) == str(code):
        raise SystemExit(f"--code {code}: its aroma_jax is not importable from PYTHONPATH")
    path = os.pathsep.join(p for p in (str(code), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, _RERUN: str(code)}
    return subprocess.run([sys.executable, __file__, *argv], env=env).returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, help="save the runs' numbers here (.npz)")
    p.add_argument(
        "--code",
        type=Path,
        default=None,
        help="another checkout whose aroma_jax runs them (default: this one)",
    )
    p.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated runs, from: {', '.join(CONFIGS)} (default: all)",
    )
    p.add_argument("--steps", type=int, default=60, help="train steps per run (60)")
    p.add_argument(
        "--compare",
        type=Path,
        nargs=2,
        metavar=("A", "B"),
        help="run nothing: compare two saves bit for bit",
    )
    args = p.parse_args(argv)
    if args.compare:
        a, b = (dict(np.load(f)) for f in args.compare)
        problems = compare(a, b)
        for line in problems:
            print(line)
        print(f"{len(a)} leaves against {len(b)}: {len(problems)} differ")
        return 1 if problems else 0
    if args.out is None:
        p.error("give --out FILE (to save runs) or --compare A B")
    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        p.error(f"--configs: unknown {unknown}; accepted: {', '.join(CONFIGS)}")
    if args.steps < 1:
        p.error(f"--steps {args.steps}: accepted a positive integer")
    code = (args.code or HERE.parent).resolve()
    if not (code / "aroma_jax" / "__init__.py").is_file():
        p.error(f"--code {args.code}: no aroma_jax package there; accepted: an aroma-jax checkout")
    if _imported_from(code) is None:  # another checkout: trace in a process that imports it
        return _rerun_with(code, sys.argv[1:] if argv is None else argv)
    import aroma_jax

    print(f"aroma_jax from {Path(aroma_jax.__file__).parent}", flush=True)
    saved: dict[str, np.ndarray] = {}
    for name in names:
        got = trace(name, args.steps)
        merges = int(got[f"{name}/steps/merged"].sum())
        stops = int(got[f"{name}/steps/newly_done"].sum())
        print(
            f"{name}: {args.steps} steps, {merges} merges, {stops} modules stopped, "
            f"{len(got)} leaves",
            flush=True,
        )
        saved.update(got)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **saved)
    print(f"{len(saved)} leaves -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
