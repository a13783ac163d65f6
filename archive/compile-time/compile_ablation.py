"""Where AROMA's compile surplus over LoRA is: the AROMA step compiled with one part removed.

    python experiments/compile_ablation.py --repeats 5 \
        --out docs/scale/compile-ablation-cpu-llama-small-L2.json -- \
        --model llama-small --devices 1 --batch 8 --seq 128 --layers 2

    # XLA's TPU compiler (libtpu on this CPU host; see compile_ratio.py):
    PYTHONPATH=/tmp/libtpu TPU_WORKER_HOSTNAMES=localhost python experiments/compile_ablation.py \
        --repeats 5 --out docs/scale/compile-ablation-tpu-v5p-llama-small-L32.json -- \
        --model llama-small --devices 8 --topology v5p:2x2x2 --batch 8 --seq 128 --layers 32

Series, alternating in every repeat, each compile in a fresh process (`compile_ratio.run`'s
child, with the compilation cache off): ``aroma`` (the full step), ``lora``, and ``aroma`` with
each ablation in ``--ablations`` (default: all of `ABLATIONS`). An ablation replaces one part of
the library in the child process only, before the step is traced; the resulting programs
compute something else and are for measuring the compiler, never for training. Two series
split the step in two: ``no-outer-step`` (everything but the outer step) and
``outer-step-alone`` (only the outer step, as its own program), so the cost of running the outer
step as a second program is the sum of their compiles; ``state-passthrough`` (a step that
returns its state) is what any program with those inputs and outputs costs. Two series compute
the same step, leaf for leaf, with part of it elsewhere: ``packed-operands`` passes the outer
step's state through its ``lax.cond`` as one flat buffer per dtype (what a flat-buffer layout
would give the branch), ``eq6-base-norm-every-step`` computes eq. 6's ``|W0 + dW|`` before the
branch, every step. Five more change how the step is written, not what it computes (up to
rounding or another random stream): ``outer-step-layer-loop`` maps the outer
step's per-module work over a stacked module's layers with ``lax.map`` instead of ``vmap``;
``eq6-contract-out-first`` and ``eq6-contract-larger-first`` contract eq. 6's ``<W0, A B>`` in
another order (so that a kernel sharded on its input axis all-reduces a scalar, not a
``(k, out)`` product); ``rbg-keys`` makes the trainer's keys ``rbg`` keys (XLA's
``RngBitGenerator`` instead of Threefry); ``fresh-draw-in-chunks`` draws the fresh pairs in a
loop of chunks (another stream too). ``a+b`` applies both replacements.

Reported per series: the compile seconds (CPU and wall; medians, minima, every run), the
optimized program's exact size (`compile_ratio.program_size`), and the per-repeat ratios (the
median of each repeat's two compiles, run back to back) to the full AROMA step and to LoRA.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import compile_ratio  # noqa: E402  (beside this script; it imports no jax at module level)

# How an ablation replaces an attribute: ``setattr`` in the child process, or pytest's
# ``monkeypatch.setattr`` in a test (undone after it).
Patch = Callable[[object, str, object], None]


@contextlib.contextmanager
def _swapped(obj: object, name: str, value: object) -> Iterator[None]:
    """``obj.name`` is ``value`` inside the block (while one function is traced), then again
    what it was."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _no_outer_step(patch: Patch = setattr) -> None:
    """The outer step never triggers: XLA drops its ``lax.cond`` (and whatever only it uses)."""
    import jax.numpy as jnp

    from aroma_jax.core import controller

    patch(controller, "outer_due", lambda ctrl, adapters, cfg: jnp.zeros((), bool))


def _outer_step_alone(patch: Patch = setattr) -> None:
    """The outer step as a program of its own, the complement of ``no-outer-step``: the keys'
    split, the pairs' norms, the trigger and `AromaTrainer.outer_step_if` (its ``lax.cond``);
    no forward, backward or optimizer update. Two programs would cost the two compiles."""
    from aroma_jax.core import controller, train_step

    def outer_alone(self, state, batch):
        del batch
        self._traces += 1
        _, _, reset_rng, keys = self.split_keys(state)
        now = controller.pair_norms(state.adapters)
        outer = controller.outer_due(state.ctrl, state.adapters, self.cfg)
        ctrl, adapters, opt_state, base, info = self.outer_step_if(
            outer,
            state.ctrl,
            state.adapters,
            state.opt_state,
            state.base,
            state.extra,
            keys,
            reset_rng,
            now,
        )
        new = state._replace(base=base, ctrl=ctrl, adapters=adapters, opt_state=opt_state)
        return new, info

    patch(train_step.AromaTrainer, "_step_impl", outer_alone)


def _state_passthrough(patch: Patch = setattr) -> None:
    """A step that computes nothing: the state comes back as it went in. What any program with
    the step's inputs and outputs (the whole sharded state, base weights included) costs the
    compiler before it computes anything: the floor under a second program."""
    from aroma_jax.core import controller, train_step

    def passthrough(self, state, batch):
        del batch
        self._traces += 1
        return state, controller.no_outer_info(len(self.paths))

    patch(train_step.AromaTrainer, "_step_impl", passthrough)


def _outer_step_as_selects(patch: Patch = setattr) -> None:
    """The outer step computed every step and selected (``jnp.where``) instead of branched to."""
    import jax
    import jax.numpy as jnp

    from aroma_jax.core import train_step

    def cond(pred, true_fn, false_fn, operands):
        new, old = true_fn(operands), false_fn(operands)
        return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)

    patch(train_step, "lax", types.SimpleNamespace(cond=cond))


def _eq6_base_norm_every_step(patch: Patch = setattr) -> None:
    """Eq. 6's ``|W0 + dW|^2`` of the unfolded modules computed every step, before the outer
    step's ``lax.cond``, and handed to the branch (the same step: only where the product of
    each kernel with its frozen factors is compiled moves, out of the branch)."""
    from aroma_jax.core import controller, norms, train_step

    outer_step_if = train_step.AromaTrainer.outer_step_if
    full_norm = norms.base_plus_product_sq_norm

    def hoisted(self, outer, ctrl, adapters, opt_state, base, extra, keys, reset_rng, now):
        kernels, s = self.kernels(base), self.cfg.scale
        norm_sq = {
            p: ctrl.base_sq[p]
            if p in self.folded
            else controller.per_layer(
                lambda w0_sq, w0, a, b: full_norm(w0_sq, w0, a, b, s), adapters.done[p].ndim
            )(ctrl.base_sq[p], kernels[p], adapters.frozen[p].a, adapters.frozen[p].b)
            for p in ctrl.base_sq
        }
        # Inside the branch eq. 6 reads the value computed above as it is.
        as_is = lambda w0_sq, w0, a, b, scale: w0_sq  # noqa: E731
        with _swapped(norms, "base_plus_product_sq_norm", as_is):
            out = outer_step_if(
                self,
                outer,
                ctrl._replace(base_sq=norm_sq),
                adapters,
                opt_state,
                base,
                extra,
                keys,
                reset_rng,
                now,
            )
        return (out[0]._replace(base_sq=ctrl.base_sq), *out[1:])

    patch(train_step.AromaTrainer, "outer_step_if", hoisted)


def _no_random_draws(patch: Patch = setattr) -> None:
    """The re-init's and the prune's uniforms (the library's only ``jax.random.uniform`` calls
    in a step without adapter dropout) from a multiplicative hash of the index, not Threefry."""
    import jax
    import jax.numpy as jnp

    def uniform(key, shape=(), dtype=jnp.float32, minval=0.0, maxval=1.0):
        del key
        n = 1
        for d in shape:
            n *= d
        bits = jnp.arange(n, dtype=jnp.uint32) * jnp.uint32(2654435761)
        x = bits.astype(jnp.float32) / 4294967296.0
        return (minval + (maxval - minval) * x).reshape(shape).astype(dtype)

    patch(jax.random, "uniform", uniform)


def _no_eq6_base_norm(patch: Patch = setattr) -> None:
    """Eq. 6's ``|W0 + dW|`` taken as ``|W0|`` (no product of the kernel with the factors)."""
    from aroma_jax.core import norms

    patch(norms, "base_plus_product_sq_norm", lambda w0_sq, w0, a, b, scale: w0_sq)


def _no_optimizer_reset(patch: Patch = setattr) -> None:
    """The merged pairs' optimizer state kept (only the re-warmup restarts)."""
    from aroma_jax.core import optim

    patch(optim, "reset", lambda tx, state, *a, **kw: state._replace(last_outer=state.count))


def _packed_operands(patch: Patch = setattr) -> None:
    """The outer step's ``lax.cond`` takes and returns its state as one flat buffer per dtype
    (every leaf raveled and concatenated; PRNG keys as they are) instead of ~100 leaves: what a
    flat-buffer layout of pairs, frozen factors and optimizer state would give the branch."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from aroma_jax.core import train_step

    def pack(tree):
        """``((one buffer per dtype, the PRNG keys), what unpack needs)``."""
        leaves, tdef = jax.tree.flatten(tree)
        is_key = [jnp.issubdtype(x.dtype, jax.dtypes.prng_key) for x in leaves]
        plain = [x for x, k in zip(leaves, is_key, strict=True) if not k]
        dtypes = sorted({str(x.dtype) for x in plain})
        bufs = tuple(
            jnp.concatenate([jnp.ravel(x) for x in plain if str(x.dtype) == d]) for d in dtypes
        )
        keys = tuple(x for x, k in zip(leaves, is_key, strict=True) if k)
        like = [(x.shape, str(x.dtype), k) for x, k in zip(leaves, is_key, strict=True)]
        return (bufs, keys), (tdef, like, dtypes)

    def unpack(packed, meta):
        (bufs, keys), (tdef, like, dtypes) = packed, meta
        offsets = dict.fromkeys(dtypes, 0)
        out, next_key = [], iter(keys)
        for shape, d, k in like:
            if k:
                out.append(next(next_key))
                continue
            n = math.prod(shape)
            out.append(bufs[dtypes.index(d)][offsets[d] : offsets[d] + n].reshape(shape))
            offsets[d] += n
        return jax.tree.unflatten(tdef, out)

    def cond(pred, true_fn, false_fn, operands):
        packed, meta = pack(operands)

        def wrap(fn):
            def g(p):
                new, info = fn(unpack(p, meta))
                return pack(new)[0], info

            return g

        out, info = lax.cond(pred, wrap(true_fn), wrap(false_fn), packed)
        return unpack(out, meta), info

    patch(train_step, "lax", types.SimpleNamespace(cond=cond))


def _outer_step_layer_loop(patch: Patch = setattr) -> None:
    """The outer step's per-module work mapped over a stacked module's layers by a loop
    (``lax.map``: one layer's slices per iteration) instead of ``vmap`` over the stacked arrays:
    the same step, but what the compiler sees does not grow with the layer count. The inner
    check keeps its ``vmap``."""
    from jax import lax

    from aroma_jax.core import controller

    outer_step = controller.outer_step

    def per_layer_loop(fn, lead_ndim):
        for _ in range(lead_ndim):
            fn = functools.partial(lambda f, *xs: lax.map(lambda x: f(*x), xs), fn)
        return fn

    def looped(*args, **kwargs):
        with _swapped(controller, "per_layer", per_layer_loop):
            return outer_step(*args, **kwargs)

    patch(controller, "outer_step", looped)


def _rbg_keys(patch: Patch = setattr) -> None:
    """The trainer's keys made as ``rbg`` keys: random bits from XLA's ``RngBitGenerator``
    instead of the Threefry hash, which XLA compiles as a graph of its own for every draw.
    Other draws than the library's (same statistics, another stream)."""
    import jax

    patch(jax.random, "key", functools.partial(jax.random.key, impl="rbg"))


def _eq6_contract_in_another_order(patch: Patch = setattr, larger_first: bool = False) -> None:
    """Eq. 6's ``<W0, A B>`` as ``sum(A * (W0 B^T))`` (the kernel contracted over its output
    axis first) instead of ``sum((A^T W0) * B)``: the same number, but where the kernel's input
    axis is sharded (fsdp on q, k, v, up) the product stays sharded and only a scalar is
    all-reduced, not the ``(k, out)`` product. ``larger_first``: over whichever axis is larger
    (the output axis on ties); on the llama shapes under fsdp that is the unsharded one for q,
    up and down (k and v, 512 x 256, still all-reduce theirs)."""
    import jax.numpy as jnp

    from aroma_jax.core import norms

    def inner(w, a, b):
        f = jnp.float32
        w, a, b = w.astype(f), a.astype(f), b.astype(f)
        if larger_first and w.shape[-2] > w.shape[-1]:
            return jnp.sum((a.T @ w) * b)
        return jnp.sum(a * (w @ b.T))

    patch(norms, "kernel_product_inner", inner)


FRESH_CHUNK = 16384  # entries per draw of `fresh-draw-in-chunks`


def _fresh_draw_in_chunks(patch: Patch = setattr) -> None:
    """The fresh pairs' one ``uniform`` over every module's ``a`` drawn in a loop of
    `FRESH_CHUNK`-entry chunks (each its own ``fold_in`` key): the Threefry kernel compiles for
    one chunk, not for the whole vector. Other draws than the library's (another stream)."""
    import jax
    import jax.numpy as jnp

    uniform, chunk = jax.random.uniform, FRESH_CHUNK

    def chunked(key, shape=(), dtype=jnp.float32, minval=0.0, maxval=1.0):
        (n,) = shape
        if n <= chunk:
            return uniform(key, shape, dtype, minval, maxval)
        m = -(-n // chunk)

        def one(i, buf):
            u = uniform(jax.random.fold_in(key, i), (chunk,), dtype, minval, maxval)
            return jax.lax.dynamic_update_slice(buf, u, (i * chunk,))

        return jax.lax.fori_loop(0, m, one, jnp.zeros((m * chunk,), dtype))[:n]

    def fresh_pairs(key, specs, r):
        from aroma_jax.core import adapters

        with _swapped(jax.random, "uniform", chunked):
            return adapters.fresh_pairs(key, specs, r)

    from aroma_jax.core import controller

    patch(controller, "fresh_pairs", fresh_pairs)


ABLATIONS = {
    "no-outer-step": _no_outer_step,
    "outer-step-alone": _outer_step_alone,
    "state-passthrough": _state_passthrough,
    "outer-step-as-selects": _outer_step_as_selects,
    "no-random-draws": _no_random_draws,
    "no-eq6-base-norm": _no_eq6_base_norm,
    "eq6-base-norm-every-step": _eq6_base_norm_every_step,
    "no-optimizer-reset": _no_optimizer_reset,
    "packed-operands": _packed_operands,
    "outer-step-layer-loop": _outer_step_layer_loop,
    "rbg-keys": _rbg_keys,
    "eq6-contract-out-first": _eq6_contract_in_another_order,
    "eq6-contract-larger-first": functools.partial(
        _eq6_contract_in_another_order, larger_first=True
    ),
    "fresh-draw-in-chunks": _fresh_draw_in_chunks,
}


def child(argv: list[str]) -> None:
    """``ABLATION SIM_ARGS...``: apply the ablation, then `compile_ratio.child` compiles."""
    name, sim_args = argv[0], argv[1:]
    sys.path.insert(0, str(HERE.parent))  # this checkout's aroma_jax, patched before tracing
    for part in name.split("+"):  # "a+b": both replacements, in that order
        if part != "none":
            ABLATIONS[part]()
    compile_ratio.child(sim_args)


def run(
    ablation: str, method: str, sim_args: list[str], env_extra: dict[str, str] | None = None
) -> dict:
    """One compile in a fresh process (`compile_ratio.run`'s, with this script as the child)."""
    return compile_ratio.run(
        method,
        sim_args,
        child_cmd=[sys.executable, str(Path(__file__).resolve()), "--child", ablation],
        env_extra=env_extra,
    )


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Per series: seconds, program size and per-repeat ratios to ``aroma`` and ``lora``."""
    out: dict = {"series": {}}
    for name, rs in runs.items():
        rec = compile_ratio.series_record(name, rs)
        for ref in ("aroma", "lora"):
            if ref in runs and ref != name:
                paired = compile_ratio._paired(rs, runs[ref])
                rec[f"per_repeat_over_{ref}"] = paired["compile_cpu_s_median"]
                rec[f"per_repeat_over_{ref}_all"] = paired["compile_cpu_s"]
        out["series"][name] = rec
    return out


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1:])
        return {}
    p, argv, sim_args = compile_ratio.parser(argv, __doc__, "series")
    p.add_argument(
        "--ablations",
        default=",".join(ABLATIONS),
        help=f"comma-separated, from: {', '.join(ABLATIONS)} (default: all); 'a+b' applies "
        "both (e.g. outer-step-alone+no-eq6-base-norm: what eq. 6's base norm costs the outer "
        "step's own program)",
    )
    args = p.parse_args(argv)
    compile_ratio.check_compile_args(p, args.repeats, sim_args)
    names = [a for a in args.ablations.split(",") if a]
    unknown = [a for a in names if any(part not in ABLATIONS for part in a.split("+"))]
    if unknown:
        p.error(f"--ablations: unknown {unknown}; accepted: {', '.join(ABLATIONS)}")
    series = {"aroma": ("none", "aroma"), "lora": ("none", "lora")}
    series.update({f"aroma/{a}": (a, "aroma") for a in names})
    runs: dict[str, list[dict]] = {s: [] for s in series}
    for rep in range(args.repeats):
        for s, (ablation, method) in series.items():
            r = run(ablation, method, sim_args)
            runs[s].append(r)
            print(
                f"repeat {rep + 1}/{args.repeats} {s:28s} [{r['target']}] L={r['layers']}: "
                f"compile {r['compile_cpu_s']:.1f} CPU s; {r['instructions']} instructions, "
                f"{r['fusions']} fusions ({r['outer_branch_fusions']} in the outer branch)",
                flush=True,
            )
    result = {"scale_sim_args": sim_args, **summarise(runs)}
    for s, rec in result["series"].items():
        over_aroma = rec.get("per_repeat_over_aroma", 1.0)
        over_lora = rec.get("per_repeat_over_lora", 1.0)
        print(
            f"{s:28s} CPU s median {rec['compile_cpu_s_median']:.1f}; per repeat over aroma "
            f"{over_aroma}, over lora {over_lora}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
