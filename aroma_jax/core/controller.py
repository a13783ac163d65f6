"""AROMA's rank-growth controller: inner checks, the global outer trigger, check/merge/reinit.

Pure functions on small pytrees, meant to run inside the jitted train step (under ``lax.cond``
for the rare outer step), so a run never leaves the device to decide anything and never
recompiles as ranks grow: merges write into preallocated slots with dynamic indices.

Per module (docs/DESIGN.md section 1):

* inner check, every ``inner_check_every`` steps: ``rho_in = (|ab|_t - |ab|_{t-dT}) / |ab|_{t-dT}``
  (eq. 5, signed); ``rho_in < inner_tol`` sets a sticky inner-converged label. The first check
  after a re-init compares with a zero norm and never converges.
* outer trigger (global): every active module inner-converged, or ``inner_max_steps`` reached.
* outer step, per active module: ``rho_out = |s a b| / |W0 + dW|`` (eq. 6, factored);
  ``rho_out < outer_tol`` discards the pair and marks the module done; otherwise the pair is
  merged into the next frozen slot (and folded into an fp32 kernel when folding), ``a`` is
  re-initialised and ``b`` zeroed. ``keep_first_pair`` skips the stop at a module's first outer
  step (the authors' code), never for a zero pair; no method merges a zero pair. A module that
  has filled all but its last slot (an explicit, binding ``rank_capacity``) stops merging and
  keeps training its pair.
* at ``max_steps`` (`AromaTrainer.finalize`) the pair still training is checked by eq. 6 like
  any other: merged if it passes, dropped if it fails. A module's rank therefore counts only
  pairs that passed eq. 6 (and, with ``keep_first_pair``, its exempt first pair).

Which of these a method uses is the method's (`aroma_jax.core.methods`): AROMA all of it; ReLoRA
the outer step every ``inner_max_steps`` with no stop rule; LoRA, DoRA and AdaLoRA none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from aroma_jax.core import norms
from aroma_jax.core.adapters import AdapterState, Frozen, ModuleSpec, Pair, fresh_pairs
from aroma_jax.core.config import AromaConfig

Array = jax.Array


class ControllerState(NamedTuple):
    step: Array  # int32: train steps taken
    inner_t: Array  # int32: steps since the latest outer step (or the start)
    outer_count: Array  # int32: outer steps so far
    prev_norm: dict[str, Array]  # |a b|_F at the previous inner check (0 after a re-init)
    inner_conv: dict[str, Array]  # sticky inner-converged labels
    base_sq: dict[str, Array]  # |W0|_F^2 of unfolded kernels (eq. 6's denominator)
    key: Array  # PRNG key for re-inits and prunes
    finished: Array  # bool: every module done, or max_steps reached
    # The method's own state (`Method.init_state`): DoRA's |W0_j|^2 per module, AdaLoRA's
    # `AllocatorState`, None for AROMA, LoRA and ReLoRA.
    method_state: Any = None


class OuterInfo(NamedTuple):
    """What an outer step did, per module in sorted path order."""

    rho_out: Array  # f32 (n,); NaN for modules that were already done
    merged: Array  # bool (n,)
    newly_done: Array  # bool (n,)
    full: Array  # bool (n,): would have merged, but only the final-merge slot is left
    converged: Array  # bool (n,): the module's inner loop ended by eq. 5 (its sticky label)


def init(
    adapters: AdapterState, kernels: Mapping[str, Array], key: Array, folded: frozenset[str]
) -> ControllerState:
    """``kernels``: the 2-D view of each base kernel (``(L, in, out)`` for stacked modules)."""
    paths = sorted(adapters.pairs)
    lead = {p: adapters.done[p].shape for p in paths}
    # Separate buffers (not one shared zero): the train step donates its state.
    return ControllerState(
        step=jnp.zeros((), jnp.int32),
        inner_t=jnp.zeros((), jnp.int32),
        outer_count=jnp.zeros((), jnp.int32),
        prev_norm={p: jnp.zeros(lead[p], jnp.float32) for p in paths},
        inner_conv={p: jnp.zeros(lead[p], jnp.bool_) for p in paths},
        base_sq={
            p: jnp.zeros(lead[p], jnp.float32)
            if p in folded
            else jnp.sum(jnp.square(kernels[p].astype(jnp.float32)), axis=(-2, -1))
            for p in paths
        },
        key=key,
        finished=jnp.zeros((), jnp.bool_),
    )


def stack_entries(d: Mapping[str, Array]) -> Array:
    """Per-entry vector: modules in sorted path order, a stacked module's layers in order."""
    return jnp.concatenate([jnp.ravel(d[p]) for p in sorted(d)])


def per_layer(fn, lead_ndim: int):
    """``fn`` written for one module, mapped over a stacked module's leading layer axis."""
    for _ in range(lead_ndim):
        fn = jax.vmap(fn)
    return fn


def _unstack(vec: Array, like: Mapping[str, Array]) -> dict[str, Array]:
    """The inverse of `stack_entries`: a per-entry vector split into ``like``'s module shapes."""
    out, start = {}, 0
    for p in sorted(like):
        n = like[p].size
        out[p] = vec[start : start + n].reshape(like[p].shape)
        start += n
    return out


def pair_norms(adapters: AdapterState) -> dict[str, Array]:
    """``|a b|_F`` of every module's pair (one value per layer of a stacked module).

    The stacked modules' norms are computed together, over zero-padded factors: one reduction
    where one per module shape made XLA:CPU compile a tree of reduction kernels for each. An
    unstacked module's stay its own computation: the same module in every layer of an unrolled
    model compiles to one shared kernel, which slicing a joint vector at per-module offsets
    would prevent.
    """
    stacked = [p for p in sorted(adapters.pairs) if adapters.done[p].ndim]
    out = {
        p: norms.product_norm(pair.a, pair.b)
        for p, pair in adapters.pairs.items()
        if p not in stacked
    }
    if stacked:
        sq = norms.products_sq_norms([(adapters.pairs[p].a, adapters.pairs[p].b) for p in stacked])
        out.update(_unstack(jnp.sqrt(sq), {p: adapters.done[p] for p in stacked}))
    return out


def inner_check(
    ctrl: ControllerState,
    adapters: AdapterState,
    cfg: AromaConfig,
    now: Mapping[str, Array] | None = None,
) -> tuple[ControllerState, Array]:
    """Eq. 5 for every module; returns the new state and ``rho_in`` (n,) (NaN where done).

    ``now``: the modules' `pair_norms`, when the caller has them (the train step computes them
    once for the inner check and the outer step); default: computed here.
    """
    conv, rhos = {}, {}
    now = pair_norms(adapters) if now is None else dict(now)

    def one(n, prev_norm, was_conv, done):
        rho = norms.inner_ratio(n, prev_norm)
        return was_conv | (~done & (rho < cfg.inner_tol)), jnp.where(done, jnp.nan, rho)

    for p in adapters.pairs:
        done = adapters.done[p]
        conv[p], rhos[p] = per_layer(one, done.ndim)(
            now[p], ctrl.prev_norm[p], ctrl.inner_conv[p], done
        )
    return ctrl._replace(inner_conv=conv, prev_norm=now), stack_entries(rhos)


def converged_or_done(ctrl: ControllerState, adapters: AdapterState) -> Array:
    """Per entry (bool ``(n,)``): inner-converged (eq. 5's sticky label) or done."""
    return stack_entries({p: ctrl.inner_conv[p] | adapters.done[p] for p in adapters.done})


def outer_due(ctrl: ControllerState, adapters: AdapterState, cfg: AromaConfig) -> Array:
    """The method's global trigger of an outer step (`Method.outer_due`): for AROMA, all active
    modules inner-converged or the inner step cap; never for a method that does not grow."""
    return cfg.plugin.outer_due(ctrl, adapters, cfg)


def write_slot(frozen: Frozen, pair: Pair, slot: Array, r: int, write: Array) -> Frozen:
    """``frozen`` with ``pair`` written into slot ``slot`` (columns of A, rows of B) if ``write``.

    A select over the whole (small) factor buffers rather than a dynamic update slice: mapped
    over a stacked module's layers, each with its own slot, a dynamic slice becomes a gather and
    its update a scatter, among the costliest kernels XLA:CPU compiles (two per stacked
    module). A slot outside the buffer writes nothing.
    """
    k = frozen.a.shape[-1]
    hit = (jnp.arange(k) // r == slot) & write  # (k,): this slot's columns
    a = jnp.where(hit, jnp.tile(pair.a.astype(frozen.a.dtype), (1, k // r)), frozen.a)
    b = jnp.where(hit[:, None], jnp.tile(pair.b.astype(frozen.b.dtype), (k // r, 1)), frozen.b)
    return Frozen(a, b)


def eq6(
    pair_norm: Array,
    fz: Frozen,
    m: Array,
    kernel: Array,
    base_sq: Array,
    cfg: AromaConfig,
    folds: bool,
    local: Any = None,
) -> tuple[Array, Array, Any]:
    """``(rho_out, stop, local)`` for one module (one layer of a stacked one): eq. 6's ratio
    ``|s a b| / |W0 + dW|`` and whether the method's stop rule (`Method.stop`: AROMA's
    ``rho < outer_tol``; none for the others) stops the module, with the rule's updated
    per-module state ``local`` (`Method.outer_local`).

    Used at every outer step and by `AromaTrainer.finalize` for the pair left at ``max_steps``.
    """
    if folds:  # the kernel already holds W0 + dW
        base_norm = jnp.sqrt(jnp.sum(jnp.square(kernel.astype(jnp.float32))))
    else:
        base_norm = jnp.sqrt(
            norms.base_plus_product_sq_norm(base_sq, kernel, fz.a, fz.b, cfg.scale)
        )
    rho = norms.outer_ratio(pair_norm, base_norm, cfg.scale)
    rule, local = cfg.plugin.stop(cfg, rho, m, pair_norm, local)
    return rho, jnp.zeros((), bool) if rule is None else rule, local


def outer_step(
    ctrl: ControllerState,
    adapters: AdapterState,
    kernels: Mapping[str, Array],
    specs: Mapping[str, ModuleSpec],
    cfg: AromaConfig,
    folded: frozenset[str],
    keys: tuple[Array, Array] | None = None,
    now: Mapping[str, Array] | None = None,
) -> tuple[ControllerState, AdapterState, dict[str, Array], OuterInfo]:
    """Check (eq. 6), merge, re-init for every active module; see the module docstring.

    ``kernels`` are the 2-D base kernels; only those in ``folded`` are read for eq. 6 as they
    are (they already hold ``W0 + dW``) and returned updated. Everything else uses factors.

    ``keys``: ``split(ctrl.key)`` (the controller's next key, the fresh pairs' key), split by a
    caller together with its own key (`AromaTrainer`'s step: one Threefry call for both);
    default: split here. ``now``: the pairs' `pair_norms`, when the caller has them.
    """
    s, method = cfg.scale, cfg.plugin
    # The last slot is kept for `AromaTrainer.finalize`: a module that has filled the others
    # stops growing but keeps training its current pair (it is not marked done, so a binding
    # capacity never ends training early).
    merge_limit = cfg.rank_capacity_derived - 1  # the last slot is the final merge's
    paths = sorted(adapters.pairs)
    key, sub = jax.random.split(ctrl.key) if keys is None else keys
    fresh_all = fresh_pairs(sub, {p: specs[p] for p in paths}, cfg.r)

    pair_norm_all = pair_norms(adapters) if now is None else now

    def one(pair, fz, m, was_done, conv, fresh, kernel, base_sq, pair_norm, local, folds):
        """One module (one layer of a stacked one): eq. 6, then merge, stop or keep training."""
        active = ~was_done
        rho, stop, local = eq6(pair_norm, fz, m, kernel, base_sq, cfg, folds, local)
        stop = active & stop
        # Never merge an exactly zero pair: it would count a rank with no update. AROMA's eq. 6
        # (ratio 0) has stopped it already unless outer_tol <= 0; ReLoRA's keeps training.
        nonzero = pair_norm > 0
        merge = active & ~stop & nonzero & (m < merge_limit)
        full = active & ~stop & nonzero & (m >= merge_limit)
        new_fz = write_slot(fz, pair, m, cfg.r, merge)
        zero = Pair(jnp.zeros_like(pair.a), jnp.zeros_like(pair.b))

        # Merged: a fresh pair. Stopped: the pair is discarded (zeros). Full: it keeps training.
        def pick(old, f, z):
            return jnp.where(merge, f, jnp.where(stop, z, old))

        new_pair = jax.tree.map(pick, pair, fresh, zero)
        new_kernel = kernel
        if folds:
            delta = (s * pair.a) @ pair.b  # once per merge, allowed
            new_kernel = jnp.where(merge, kernel + delta.astype(kernel.dtype), kernel)
        now_done = was_done | stop
        info = (jnp.where(active, rho, jnp.nan), merge, now_done & ~was_done, full, active & conv)
        return new_pair, new_fz, m + merge.astype(jnp.int32), now_done, new_kernel, info, local

    pairs, frozen, merges, done = {}, {}, {}, {}
    new_kernels, infos, locals_ = {}, {}, {}
    for p in paths:
        folds = p in folded
        lead_ndim = adapters.done[p].ndim
        pair, fz, m, d, k, info, locals_[p] = per_layer(
            lambda *xs, folds=folds: one(*xs, folds=folds), lead_ndim
        )(
            adapters.pairs[p],
            adapters.frozen[p],
            adapters.merges[p],
            adapters.done[p],
            ctrl.inner_conv[p],
            fresh_all[p],
            kernels[p],
            ctrl.base_sq[p],
            pair_norm_all[p],
            method.outer_local(ctrl.method_state, p),
        )
        pairs[p], frozen[p], merges[p], done[p] = pair, fz, m, d
        if folds:
            new_kernels[p] = k
        infos[p] = info
    adapters = AdapterState(pairs, frozen, merges, done)
    ctrl = ctrl._replace(
        inner_t=jnp.zeros((), jnp.int32),
        outer_count=ctrl.outer_count + 1,
        prev_norm={p: jnp.zeros_like(ctrl.prev_norm[p]) for p in paths},
        inner_conv={p: jnp.zeros_like(ctrl.inner_conv[p]) for p in paths},
        key=key,
        method_state=method.with_outer_locals(ctrl.method_state, locals_),
    )
    info = OuterInfo(*(stack_entries({p: infos[p][j] for p in paths}) for j in range(5)))
    return ctrl, adapters, new_kernels, info


def no_outer_info(n: int) -> OuterInfo:
    """The `OuterInfo` of a step without an outer step (for ``lax.cond``'s other branch)."""
    no = jnp.zeros((n,), bool)
    return OuterInfo(jnp.full((n,), jnp.nan, jnp.float32), no, no, no, no)


def all_done(adapters: AdapterState) -> Array:
    return jnp.all(stack_entries(adapters.done))
