"""An optax wrapper that masks per-module updates, resets merged pairs' state and re-warms.

AROMA needs three things from its optimizer that a static ``optax.masked`` cannot give, because
which modules are done changes while training:

* ``update(..., active=mask)`` zeroes the updates (and the incoming gradients) of every leaf whose
  mask is False: done modules and, once training has finished, everything;
* `reset` re-initialises (``"full"``) or randomly prunes (``"prune"``, paper and ReLoRA: zero a
  ``ratio`` of the entries) the optimizer state of the pairs that were just merged, and
* it records the step of that outer step, so updates are scaled by a linear re-warmup that starts
  at the *actual* (adaptive) outer steps; ``update(..., rewarm=mask)`` limits the re-warmup to
  the leaves that are reset (the pairs), so fully trained heads keep their schedule.

All of it is pure and jit-safe (``jnp.where`` blends, no Python branching on values).

Adam's bias correction: with ``bias_correction="shared"`` (the paper's code) one count serves
every leaf and survives resets, so a reset pair's pruned moments are corrected at the global
step and it moves faster than the nominal rate for hundreds of steps (see `aroma_jax.core.adam`);
the re-warmup only covers the first few. ``"per_module"`` uses `adam.scale_by_adam_per_leaf` and
`reset` restarts the count of every reset leaf, so a fresh pair starts with Adam's first step.

Example:
    >>> import jax.numpy as jnp, optax
    >>> from aroma_jax.core import optim
    >>> tx = optim.wrap(optax.sgd(1.0), rewarmup_steps=2)
    >>> params = {"a": jnp.ones(2), "b": jnp.ones(2)}
    >>> state = tx.init(params)
    >>> active = {"a": jnp.array(True), "b": jnp.array(False)}
    >>> upd, state = tx.update(params, state, params, active=active)
    >>> upd["a"].tolist(), upd["b"].tolist()
    ([-1.0, -1.0], [0.0, 0.0])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from aroma_jax.core import adam
from aroma_jax.core.config import AromaConfig

Array = jax.Array


class WrappedState(NamedTuple):
    inner: optax.OptState
    count: Array  # updates applied so far (int32)
    last_outer: Array  # `count` at the latest outer step; -1 before the first


def rewarm_factor(count: Array, last_outer: Array, rewarmup_steps: int) -> Array:
    """Linear re-warmup: ``1/R, 2/R, ..., 1`` over the ``R`` updates after an outer step."""
    if rewarmup_steps <= 0:
        return jnp.ones((), jnp.float32)
    k = (count - last_outer + 1).astype(jnp.float32)
    ramp = jnp.minimum(1.0, k / rewarmup_steps)
    return jnp.where(last_outer >= 0, ramp, 1.0)


def wrap(
    inner: optax.GradientTransformation, rewarmup_steps: int = 0
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` with per-leaf masking and a re-warmup after outer steps (see module doc)."""

    def init_fn(params):
        return WrappedState(inner.init(params), jnp.zeros((), jnp.int32), -jnp.ones((), jnp.int32))

    def update_fn(updates, state, params=None, *, active=None, rewarm=None, **extra):
        del extra
        if active is None:
            active = jax.tree.map(lambda _: jnp.ones((), bool), updates)
        if rewarm is None:
            rewarm = jax.tree.map(lambda _: jnp.ones((), bool), updates)
        updates = jax.tree.map(lambda u, m: jnp.where(m, u, 0), updates, active)
        new_updates, inner_state = inner.update(updates, state.inner, params)
        factor = rewarm_factor(state.count, state.last_outer, rewarmup_steps)

        def scale(u, m, w):
            return jnp.where(m, u * jnp.where(w, factor, 1.0).astype(u.dtype), 0)

        new_updates = jax.tree.map(scale, new_updates, active, rewarm)
        return new_updates, WrappedState(inner_state, state.count + 1, state.last_outer)

    # Keep the inner transformation reachable: `reset` needs its `init` to find the param-shaped
    # parts of the state (a NamedTuple takes no new attributes; a function does).
    update_fn.inner = inner  # type: ignore[attr-defined]
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _param_leaves(inner: optax.GradientTransformation, state: optax.OptState) -> list[Array]:
    """The leaves of every param-shaped subtree of ``state``, in traversal order."""
    leaves: list[Array] = []

    def collect(x):
        leaves.append(x)
        return x

    optax.tree_utils.tree_map_params(inner, collect, state)
    return leaves


def reset(
    tx: optax.GradientTransformationExtraArgs,
    state: WrappedState,
    mask: Any,
    key: Array,
    params: Any,
    mode: str,
    prune_ratio: float = 0.999,
    keep: Any = None,
) -> WrappedState:
    """Starts the re-warmup and resets the state of the leaves where ``mask`` is True.

    Args:
      tx: the transformation made by `wrap`.
      state: its state.
      mask: a params-shaped tree of bools: which leaves' state to reset; a scalar per leaf, or
        ``(L, 1, ...)`` per layer for a layer-stacked leaf.
      key: PRNG key for ``"prune"``.
      params: the (new) parameters; ``"full"`` re-initialises from them.
      mode: ``"prune"`` zeroes a random ``prune_ratio`` of each masked leaf's entries (all of an
        entry's state together, so no first moment survives without its second moment),
        ``"full"`` sets them to a fresh ``init``, ``"none"`` leaves them as they are.
      keep: for ``"prune"``, a params-shaped tree of bools: the entries to keep. `AromaTrainer`
        draws it per (module, layer) with `adapters.prune_keep`, so stacked and unrolled models
        prune alike. Default: one draw over all leaves, sliced in traversal order.
    """
    inner = tx.update.inner  # type: ignore[attr-defined]
    new_inner = state.inner
    if mode == "prune":
        # One keep/zero draw per *parameter entry*, shared by all of that entry's state (Adam's
        # mu and nu alike). Independent masks (ReLoRA's `random_pruning_`) keep a first moment
        # whose second moment was zeroed for ~0.1% of entries; a fresh pair's `a` gets an exactly
        # zero gradient at its first step (b = 0), so such an entry's update is m / eps: a jump of
        # ~1e4-1e5 x lr that blew fresh pairs up to 21x |W| in real runs (docs/REPRODUCTION.md).
        # One uniform draw over all parameters, sliced in traversal order: a single random-number
        # kernel in the compiled step. The barrier keeps it single: without it XLA fuses the
        # (elementwise) Threefry hash into every slice's consumer, one copy per layout group.
        if keep is None:
            leaves, treedef = jax.tree.flatten(params)
            u = jax.random.uniform(key, (max(sum(x.size for x in leaves), 1),))
            drawn = jax.lax.optimization_barrier(u < 1.0 - prune_ratio)
            keeps, start = [], 0
            for x in leaves:
                keeps.append(drawn[start : start + x.size].reshape(x.shape))
                start += x.size
            keep_tree = treedef.unflatten(keeps)
        else:
            keep_tree = keep

        def prune(x, m, keep):
            return jnp.where(m & ~keep, jnp.zeros_like(x), x)

        new_inner = optax.tree_utils.tree_map_params(inner, prune, state.inner, mask, keep_tree)
    elif mode == "full":
        fresh = iter(_param_leaves(inner, inner.init(params)))
        new_inner = optax.tree_utils.tree_map_params(
            inner, lambda x, m: jnp.where(m, next(fresh), x), state.inner, mask
        )
    elif mode != "none":
        raise ValueError(f"unknown reset mode {mode!r}: accepted 'prune', 'full', 'none'")
    if mode != "none":  # per-leaf Adam counts (bias_correction="per_module") start over too
        new_inner = adam.restart_all(new_inner, mask)
    return WrappedState(new_inner, state.count, state.count)


def base_schedule(cfg: AromaConfig) -> Callable[[Array], Array]:
    """Initial linear warmup, then ``cfg.schedule`` down to ``cfg.max_steps``.

    The argument is optax's 0-based update count; the first update gets ``lr / warmup_steps``
    rather than zero.
    """
    peak, warm, total = cfg.learning_rate, cfg.warmup_steps, cfg.max_steps
    floor = cfg.min_lr_ratio

    def schedule(count):
        t = jnp.asarray(count, jnp.float32) + 1.0
        w = jnp.minimum(1.0, t / warm) if warm > 0 else 1.0
        p = jnp.clip((t - warm) / max(total - warm, 1), 0.0, 1.0)
        if cfg.schedule == "linear":
            decay = 1.0 - p
        elif cfg.schedule == "cosine":
            decay = 0.5 * (1.0 + jnp.cos(jnp.pi * p))
        else:
            decay = 1.0
        if floor > 0 and cfg.schedule != "constant":
            decay = floor + (1.0 - floor) * decay  # decays to floor * peak, not to 0
        return peak * w * decay

    return schedule


# Leaves HF's AdamW grouping exempts from weight decay: biases, norm scales, embeddings.
_NO_DECAY = ("bias", "layernorm", "layer_norm", "rmsnorm", "norm", "ln_", "embed")


def hf_decay_mask(trainable: Any) -> Any:
    """``weight_decay_mask="hf"``: True where a trained leaf decays (see `_NO_DECAY`).

    Adapter pairs always decay (PEFT's LoRA weights are in HF's decay group); other leaves decay
    unless a name on their path is a bias, a norm or an embedding.
    """

    def decays(path, _leaf) -> bool:
        names = [str(getattr(k, "key", getattr(k, "name", k))).lower() for k in path]
        if names and names[0] == "pairs":
            return True
        return not any(tag in n for n in names for tag in _NO_DECAY)

    return jax.tree_util.tree_map_with_path(decays, trainable)


def make_optimizer(
    cfg: AromaConfig, lead_ndim: adam.LeadNdim | None = None
) -> optax.GradientTransformationExtraArgs:
    """AdamW on the base schedule (optionally clipped), wrapped for masking, resets, re-warmups.

    ``lead_ndim``: see `adam.scale_by_adam_per_leaf` (layer-stacked adapter leaves).
    """
    parts = []
    if cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    if cfg.bias_correction == "per_module":
        parts.append(
            adam.scale_by_adam_per_leaf(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, lead_ndim=lead_ndim)
        )
    else:
        parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    if cfg.weight_decay > 0:
        mask = hf_decay_mask if cfg.weight_decay_mask == "hf" else None
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=mask))
    parts.append(optax.scale_by_learning_rate(base_schedule(cfg)))
    return wrap(optax.chain(*parts), rewarmup_steps=cfg.rewarmup_steps if cfg.grows else 0)


def learning_rate(cfg: AromaConfig, state: WrappedState) -> Array:
    """The effective learning rate of the next update (for logging)."""
    rewarm = cfg.rewarmup_steps if cfg.grows else 0
    return base_schedule(cfg)(state.count) * rewarm_factor(state.count, state.last_outer, rewarm)
