"""Adding adapter outputs to matched Dense calls of any ``flax.linen`` model.

`flax.linen.intercept_methods` lets us wrap every ``Dense.__call__`` and ``DenseGeneral.__call__``
while a model runs, so an unmodified model (an HF Flax model, say) with an unmodified parameter
tree gains ``y += s * (x @ a) @ b`` (+ ``s * (x @ A) @ B`` for the frozen merged part) on the
modules whose path has an adapter. Nothing dense is formed: the input is contracted with the
``(in, r)`` factor first. When a module has both a trainable pair and unfolded frozen factors
(bases that cannot fold, e.g. bf16), both go through one contraction with ``[A | a]`` and
``[B; b]``, so the step reads the activation and its gradient once for the whole adapter.

Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from aroma_jax.core import inject
    >>> from aroma_jax.core.adapters import Pair
    >>> model = nn.Sequential([nn.Dense(3)])  # one Dense at path "layers_0"
    >>> v = model.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> pair = Pair(jnp.ones((4, 1)), jnp.ones((1, 3)))
    >>> with inject.adapters_applied({"layers_0": (pair, None)}, scale=1.0):
    ...     y = model.apply(v, jnp.ones((1, 4)))
    >>> bool(jnp.allclose(y - model.apply(v, jnp.ones((1, 4))), 4.0))
    True
"""

from __future__ import annotations

import contextlib
import contextvars
import zlib
from collections.abc import Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from aroma_jax.core.adapters import Frozen, Pair

Array = jax.Array


def _contract(x: Array, y: Array, x_axes: tuple[int, ...], y_axes: tuple[int, ...]) -> Array:
    """``dot_general`` with fp32 accumulation, no batch axes.

    GPUs and TPUs multiply bf16 operands into an fp32 result natively; XLA:CPU has no such dot
    (``BF16 x BF16 = F32`` is unimplemented), so there the operands are widened first, which
    is exact and gives the same product.
    """
    if jax.default_backend() == "cpu" and (x.dtype != jnp.float32 or y.dtype != jnp.float32):
        x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    return lax.dot_general(x, y, ((x_axes, y_axes), ((), ())), preferred_element_type=jnp.float32)


def _expand(h: Array, b: Array) -> Array:
    """``h @ b`` for ``h: (..., r)``; for ``r = 1`` an outer broadcast XLA fuses into the add."""
    if h.shape[-1] == 1:
        return h * b[0]
    return _contract(h, b, (h.ndim - 1,), (0,)).astype(h.dtype)


@jax.custom_vjp
def _low_rank(x: Array, a: Array, b: Array) -> Array:
    """``(x @ a) @ b`` whose forward and backward passes are all dots in canonical layouts."""
    return _low_rank_fwd(x, a, b)[0]


def _low_rank_fwd(x, a, b):
    h = _contract(x, a, (x.ndim - 1,), (0,)).astype(x.dtype)  # (..., r)
    return _expand(h, b), (x, a, b, h)


def _low_rank_bwd(res, g):
    # Every product is a dot_general whose operands need no transposed copy of an activation:
    # the token axes are contracted with the small (tokens, r) operand on the left, so XLA
    # never materialises x^T or a broadcast of h/b (on XLA:CPU an elementwise-multiply-and-
    # reduce formulation made it write full-size broadcasts, 1.2x the floor; these dots run
    # at the floor's speed; see docs/BENCHMARKS.md).
    x, a, b, h = res
    lead = tuple(range(x.ndim - 1))
    gh = _contract(g, b, (g.ndim - 1,), (1,)).astype(g.dtype)  # (..., r)
    db = _contract(h, g, lead, lead).astype(b.dtype)  # (r, out)
    da = _contract(gh, x, lead, lead).T.astype(a.dtype)  # (in, r)
    dx = _expand(gh, a.T).astype(x.dtype)
    return dx, da, db


_low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


@jax.custom_vjp
def _low_rank_joint(x: Array, a: Array, b: Array, fa: Array, fb: Array) -> Array:
    """``(x @ [fa | a]) @ [fb; b]`` with gradients for ``x``, ``a`` and ``b`` only."""
    return _low_rank_joint_fwd(x, a, b, fa, fb)[0]


def _low_rank_joint_fwd(x, a, b, fa, fb):
    # Concatenating the small factors (a few hundred KB per module) costs less than a second
    # pass over x in the forward and over g in the backward (measured: docs/BENCHMARKS.md).
    aa = jnp.concatenate([fa, a], axis=1)  # (in, k + r)
    bb = jnp.concatenate([fb, b], axis=0)  # (k + r, out)
    h = _contract(x, aa, (x.ndim - 1,), (0,)).astype(x.dtype)  # (..., k + r)
    y = _contract(h, bb, (h.ndim - 1,), (0,)).astype(x.dtype)
    return y, (x, aa, bb, h, a)


def _low_rank_joint_bwd(res, g):
    # As `_low_rank_bwd`, over all k + r columns for dx; da and db only over the pair's r.
    x, aa, bb, h, a = res
    k = aa.shape[1] - a.shape[1]
    lead = tuple(range(x.ndim - 1))
    gh = _contract(g, bb, (g.ndim - 1,), (1,)).astype(g.dtype)  # (..., k + r)
    dx = _contract(gh, aa, (gh.ndim - 1,), (1,)).astype(x.dtype)
    db = _contract(h[..., k:], g, lead, lead).astype(bb.dtype)  # (r, out)
    da = _contract(gh[..., k:], x, lead, lead).T.astype(aa.dtype)  # (in, r)
    # The frozen factors get zero cotangents; callers stop their gradient, so XLA drops these.
    return dx, da, db, jnp.zeros_like(aa[:, :k]), jnp.zeros_like(bb[:k])


_low_rank_joint.defvjp(_low_rank_joint_fwd, _low_rank_joint_bwd)


def lowrank_delta(x: Array, a: Array, b: Array, scale: float) -> Array:
    """``scale * (x @ a) @ b`` for ``x: (..., in)``, ``a: (in, r)``, ``b: (r, out)``."""
    a = a.astype(x.dtype)
    b = b.astype(x.dtype)
    return _low_rank(x, a * jnp.asarray(scale, x.dtype), b)


def frozen_delta(x: Array, a: Array, b: Array, scale: float) -> Array:
    """``scale * (x @ A) @ B`` for frozen factors: gradients flow to ``x`` only."""
    a = lax.stop_gradient(a.astype(x.dtype)) * jnp.asarray(scale, x.dtype)
    return _low_rank(x, a, lax.stop_gradient(b.astype(x.dtype)))


def joint_delta(
    x: Array, a: Array, b: Array, frozen_a: Array, frozen_b: Array, scale: float
) -> Array:
    """``scale * (x @ [A | a]) @ [B; b]``: trainable pair plus frozen factors, one pass.

    Equals ``lowrank_delta(x, a, b, scale) + frozen_delta(x, A, B, scale)``; gradients flow to
    ``x``, ``a`` and ``b`` only.
    """
    sc = jnp.asarray(scale, x.dtype)
    fa = lax.stop_gradient(frozen_a.astype(x.dtype)) * sc
    fb = lax.stop_gradient(frozen_b.astype(x.dtype))
    return _low_rank_joint(x, a.astype(x.dtype) * sc, b.astype(x.dtype), fa, fb)


ModuleAdapters = Mapping[str, tuple[Pair | None, Frozen | None]]

# A stacked module's adapters (one layer of an ``nn.scan``-ed stack) travel as leaves of the
# Dense's own params, which the scan slices per layer like the kernel: `stacked_leaves` makes
# them, `adapters_applied` reads them where its ``modules`` map a path to `IN_PARAMS`.
IN_PARAMS = "in_params"
DROP_KEY = "aroma_dropout_key"
COLUMN_SCALE = "aroma_column_scale"  # DoRA's f = m / n of one layer, (out,)


def stacked_leaves(
    pair: Pair | None, frozen: Frozen | None, column_scale: Array | None = None
) -> dict[str, Array]:
    """The params leaves carrying a stacked module's ``(pair, frozen)`` and DoRA's column scale
    (see `IN_PARAMS`)."""
    out = {}
    if pair is not None:
        out["aroma_a"], out["aroma_b"] = pair.a, pair.b
    if frozen is not None:
        out["aroma_frozen_a"], out["aroma_frozen_b"] = frozen.a, frozen.b
    if column_scale is not None:
        out[COLUMN_SCALE] = column_scale
    return out


def _from_params(
    module: nn.Module,
) -> tuple[Pair | None, Frozen | None, Array | None, Array | None]:
    """One layer's ``(pair, frozen, dropout key, column scale)`` from the Dense's params."""
    params = module.variables.get("params", {})
    pair = Pair(params["aroma_a"], params["aroma_b"]) if "aroma_a" in params else None
    frozen = None
    if "aroma_frozen_a" in params:
        frozen = Frozen(params["aroma_frozen_a"], params["aroma_frozen_b"])
    key = params.get(DROP_KEY)
    key = None if key is None else jax.random.wrap_key_data(key)
    return pair, frozen, key, params.get(COLUMN_SCALE)


def _module_path(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.path)


def _flatten_input(module: nn.Module, x: Array, in_ndim: int) -> tuple[Array, tuple[int, ...]]:
    """Views ``x`` as ``(..., fan_in)``; rejects DenseGeneral layouts the adapter cannot follow."""
    if isinstance(module, nn.DenseGeneral):
        axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
        axis = tuple(ax % x.ndim for ax in axis)
        if module.batch_dims or axis != tuple(range(x.ndim - len(axis), x.ndim)):
            raise ValueError(
                f"module {_module_path(module)!r}: adapters support DenseGeneral contracting the "
                f"trailing input axes without batch_dims; got axis={module.axis}, "
                f"batch_dims={module.batch_dims}"
            )
        in_ndim = len(axis)
    lead = x.shape[: x.ndim - in_ndim]
    return x.reshape(lead + (-1,)), lead


def dropped(x: Array, rate: float, key: Array) -> Array:
    """Inverted dropout (``torch.nn.Dropout`` semantics): zero a ``rate`` share, scale the rest."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def _dora_output(
    y: Array,
    delta: Array | None,
    f: Array,
    lead: tuple[int, ...],
    bias: Array | None,
    dropped_base: Array | None = None,
) -> Array:
    """PEFT's DoRA output ``y + (f - 1) * (x' W0) + f * delta`` from the base call's ``y``.

    Without dropout ``x' = x`` and ``x W0 = y - bias``, so ``W0`` is not applied again; with
    dropout ``x'`` is the dropped input and ``dropped_base = x' W0`` (PEFT's second pass).
    """
    features = y.shape[len(lead) :]
    f = f.reshape(features).astype(y.dtype)
    if dropped_base is not None:
        base = dropped_base.reshape(lead + features)
    else:
        base = y if bias is None else y - bias.astype(y.dtype)
    out = y + (f - 1) * base
    if delta is not None:
        out = out + f * delta.reshape(lead + features).astype(y.dtype)
    return out


# The per-call function of the innermost running `adapters_applied` block, for modules that
# `flax.linen.intercept_methods` cannot see (Flax NNX layers, `aroma_jax.core.nnx_adapt`).
_CALL_HOOK: contextvars.ContextVar[Callable[..., Array] | None] = contextvars.ContextVar(
    "aroma_call_hook", default=None
)


def active_hook() -> Callable[..., Array] | None:
    """``hook(path, x, y, kernel, bias, in_ndim) -> y'`` of the running `adapters_applied`
    block (``None`` outside one): ``y`` plus the adapter output of the module at ``path``,
    which contracted the trailing ``in_ndim`` axes of ``x`` with ``kernel`` (unchanged when
    ``path`` has no adapter)."""
    return _CALL_HOOK.get()


@contextlib.contextmanager
def adapters_applied(
    modules: ModuleAdapters,
    scale: float,
    in_ndim: Mapping[str, int] | None = None,
    dropout: tuple[float, Array] | None = None,
    column_scale: Mapping[str, Array] | None = None,
) -> Iterator[set[str]]:
    """Within the block, matched Dense calls add their adapter's output.

    Args:
      modules: path -> ``(pair, frozen)``; either may be ``None`` to skip it (e.g. the frozen part
        once it is folded into the kernel).
      scale: ``alpha / r``.
      in_ndim: per path, the number of contracted input axes (for DenseGeneral); default 1.
      dropout: ``(rate, key)``: dropout on the trainable pair's input only, PEFT's
        ``lora_dropout`` (``s * b(a(dropout(x)))``); the frozen factors see ``x``. Each module
        call draws its own mask (the key folded with the module's path and call count).
      column_scale: path -> DoRA's factor ``f = m / n`` ``(out,)`` (`aroma_jax.core.methods.dora`):
        those modules return ``f * (x W0 + delta) + bias`` instead of ``y + delta``. An
        `IN_PARAMS` module reads its layer's factor from its params (`COLUMN_SCALE`).

    Yields the set of paths whose adapter was applied, filled in as the model runs (at trace
    time under ``jit``), so callers can detect adapters that never met their module.
    """
    hits: set[str] = set()
    in_ndim = dict(in_ndim or {})
    column_scale = dict(column_scale or {})
    calls: dict[str, int] = {}

    def drop_key(path: str) -> Array:
        calls[path] = calls.get(path, 0) + 1
        key = jax.random.fold_in(dropout[1], zlib.crc32(path.encode()) & 0x7FFFFFFF)
        return jax.random.fold_in(key, calls[path])

    def adapt(
        path: str,
        x2: Array,
        lead: tuple[int, ...],
        y: Array,
        kernel: Array,
        bias: Array | None,
        layer: tuple | None = None,
    ) -> Array:
        """``y`` plus the adapter output of ``path`` for the flat input ``x2: (..., fan_in)``;
        ``layer``: a stacked module's ``(pair, frozen, dropout key, column scale)``."""
        x2 = x2.astype(y.dtype)
        layer_key, col = None, column_scale.get(path)
        if layer is not None:
            pair, frozen, layer_key, col = layer
        else:
            pair, frozen = modules[path]
        if pair is not None and pair.a.shape[-2] != x2.shape[-1]:
            raise ValueError(
                f"module {path!r}: its adapter expects {pair.a.shape[-2]} input features but "
                f"the module got {x2.shape[-1]}; a kernel of shape {kernel.shape} with a "
                "leading layer axis is a layer stack under nn.scan: pass "
                "AromaTrainer(..., stacked={prefix: layers})"
            )
        has_frozen = frozen is not None and frozen.a.shape[-1] > 0
        dropped_base = None
        if pair is not None and dropout is not None and dropout[0] > 0:
            key = drop_key(path)
            if layer_key is not None:  # under a scan the path repeats: the layer's own key
                key = jax.random.fold_in(layer_key, calls[path])
            xd = dropped(x2, dropout[0], key)
            delta = lowrank_delta(xd, pair.a, pair.b, scale)
            if col is not None:  # PEFT's DoRA applies W0 to the dropped input as well
                w0 = kernel.reshape(xd.shape[-1], -1)
                dropped_base = _contract(xd, w0, (xd.ndim - 1,), (0,)).astype(y.dtype)
            if has_frozen:
                delta = delta + frozen_delta(x2, frozen.a, frozen.b, scale)
        elif pair is not None and has_frozen:
            delta = joint_delta(x2, pair.a, pair.b, frozen.a, frozen.b, scale)
        elif pair is not None:
            delta = lowrank_delta(x2, pair.a, pair.b, scale)
        elif has_frozen:
            delta = frozen_delta(x2, frozen.a, frozen.b, scale)
        else:
            delta = None
        hits.add(path)
        if col is not None:
            return _dora_output(y, delta, col, lead, bias, dropped_base)
        if delta is None:
            return y
        return y + delta.reshape(lead + y.shape[len(lead) :]).astype(y.dtype)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.DenseGeneral)):
            return next_fun(*args, **kwargs)
        path = _module_path(module)
        y = next_fun(*args, **kwargs)
        if path not in modules:
            return y
        x = args[0] if args else kwargs["inputs"]
        x2, lead = _flatten_input(module, x, in_ndim.get(path, 1))
        params = module.variables.get("params", {})
        bias = params.get("bias") if module.use_bias else None
        layer = _from_params(module) if isinstance(modules[path], str) else None  # IN_PARAMS
        return adapt(path, x2, lead, y, params["kernel"], bias, layer)

    def hook(path: str, x: Array, y: Array, kernel: Array, bias: Array | None, n: int) -> Array:
        if path not in modules:
            return y
        if isinstance(modules[path], str):
            raise ValueError(
                f"module {path!r}: stacked adapters (IN_PARAMS) are read from linen params; "
                "a module outside linen gets path-keyed adapters only"
            )
        lead = x.shape[: x.ndim - n]
        return adapt(path, x.reshape(lead + (-1,)), lead, y, kernel, bias)

    token = _CALL_HOOK.set(hook)
    try:
        with nn.intercept_methods(interceptor):
            yield hits
    finally:
        _CALL_HOOK.reset(token)
