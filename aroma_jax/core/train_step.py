"""One jitted AROMA train step over any loss built from ``flax.linen`` models.

`AromaTrainer` ties the pieces together: it splits the model's params into a frozen base and
fully trained extras (task heads), builds the adapters, and compiles a step that

1. runs ``loss_fn`` with the adapters injected and takes gradients w.r.t. the pairs and extras;
2. applies the wrapped optimizer, masking done modules (and everything once finished);
3. advances the controller *after* the update: an inner check when due (computed every step,
   kept only at check steps: a few scalars per module, cheaper to compile than a branch), then,
   under ``lax.cond``, the outer step (eq. 6, merge, re-init) and the optimizer-state reset of
   the merged pairs, so a fresh pair never takes a step with its predecessor's gradient.

The step is traced once per run: a Python counter in the traced function (`compiles`) proves it.

Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from aroma_jax import AromaConfig, AromaTrainer
    >>> model = nn.Sequential([nn.Dense(4)])  # one Dense at path "layers_0"
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
    >>> def loss_fn(p, batch, rng):
    ...     return jnp.mean((model.apply({"params": p}, batch["x"]) - batch["y"]) ** 2)
    >>> cfg = AromaConfig(target_modules=("layers_0",), max_steps=20, warmup_steps=0)
    >>> trainer = AromaTrainer(loss_fn, params, cfg)
    >>> state = trainer.init(params)
    >>> batch = {"x": jnp.ones((2, 8)), "y": jnp.zeros((2, 4))}
    >>> state, info = trainer.step(state, batch)
    >>> int(info.step), trainer.compiles
    (1, 1)
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze
from jax import lax

from aroma_jax.core import accumulate, controller, inject, norms, optim
from aroma_jax.core import adapters as adapters_lib
from aroma_jax.core.adapters import AdapterState, ModuleSpec
from aroma_jax.core.config import AromaConfig, ConfigError

Array = jax.Array
Params = Mapping[str, Any]
SLOT_COST_COLUMNS = 64  # above this many frozen columns per unfolded kernel, warn about cost


class SlotCostWarning(UserWarning):
    """Unfolded kernels with many frozen slots: every step multiplies all of them."""


LossFn = Callable[[Params, Any, Array], Any]


class TrainState(NamedTuple):
    base: dict  # frozen model params (HF layout), kernels folded when folding; no extras
    extra: dict  # fully trained non-adapter params (heads), nested like `base`
    adapters: AdapterState
    opt_state: optim.WrappedState
    ctrl: controller.ControllerState
    rng: Array  # for dropout and other stochastic layers


class StepInfo(NamedTuple):
    """Per-step outputs; vectors are per module in sorted path order (`AromaTrainer.paths`)."""

    step: Array
    loss: Array
    lr: Array
    checked: Array  # an inner check ran at this step
    rho_in: Array  # (n,) eq. 5 where checked, NaN otherwise
    outer: Array  # an outer step ran at this step
    rho_out: Array  # (n,) eq. 6 where an outer step ran, NaN otherwise
    merged: Array  # (n,) bool
    newly_done: Array  # (n,) bool
    ranks: Array  # (n,) int32 merged rank after this step
    finished: Array
    by_cap: Array  # an outer step ran because T_in was reached (not every module converged)
    converged: Array  # (n,) bool at an outer step: the module's inner loop ended by eq. 5
    full: Array  # (n,) bool at an outer step: the module could not merge (capacity)
    inner_label: Array  # (n,) bool where checked: eq. 5's label (rho_in < inner_tol), on device


def _get(tree: Mapping, path: str) -> Any:
    for k in path.split("/"):
        tree = tree[k]
    return tree


def _set(tree: dict, path: str, value: Any) -> dict:
    """A copy of ``tree`` with ``path`` replaced (shallow copies along the path only)."""
    head, _, rest = path.partition("/")
    out = dict(tree)
    out[head] = _set(tree[head], rest, value) if rest else value
    return out


def _lead(mask: Array, leaf: Array) -> Array:
    """A per-module mask (scalar, or ``(L,)`` for a stacked module) shaped to broadcast over
    one of its leaves (``(L, in, r)``, ...)."""
    return mask.reshape(mask.shape + (1,) * (leaf.ndim - mask.ndim))


def split_params(params: Params, patterns: tuple[str, ...]) -> tuple[dict, dict]:
    """(base, extra): leaves under any module path matched by ``patterns`` go to ``extra``."""
    flat = traverse_util.flatten_dict(unfreeze(adapters_lib.strip_collection(params)), sep="/")
    if not patterns:
        return traverse_util.unflatten_dict(flat, sep="/"), {}
    prefixes = {k.rsplit("/", i)[0] for k in flat for i in range(1, k.count("/") + 1)}
    chosen = adapters_lib.select(prefixes, patterns, "train_patterns")
    is_extra = lambda k: any(k == c or k.startswith(c + "/") for c in chosen)
    base = {k: v for k, v in flat.items() if not is_extra(k)}
    extra = {k: v for k, v in flat.items() if is_extra(k)}
    return traverse_util.unflatten_dict(base, sep="/"), traverse_util.unflatten_dict(extra, sep="/")


def merge_params(base: Mapping, extra: Mapping) -> dict:
    """``base`` with the ``extra`` subtrees put back (trace-time dict work only)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge_params(out.get(k, {}), v) if isinstance(v, Mapping) else v
    return out


class AromaTrainer:
    """Builds the state and the one compiled train step for a loss over a linen model.

    Args:
      loss_fn: ``loss_fn(params, batch, rng) -> loss`` or ``(loss, aux)``; ``params`` is the
        model's params collection (HF layout). Any linen model applied inside gets adapters.
      params: the model's params (collection or ``{"params": ...}``), used for shapes here.
      cfg: the AROMA config.
      in_ndim: per module path, the contracted axes of a DenseGeneral kernel (default 1).
      donate: donate the state's buffers to the step (off for tests that reuse a state).
      stacked: path of a layer stack run under ``nn.scan`` -> its length (e.g.
        ``{"model/layers": 32}``): its adapters are stacked along a leading layer axis and
        enter the model as extra params leaves the scan slices (`aroma_jax.core.inject`).
      grad_accum: micro-batches per optimizer step (`aroma_jax.core.accumulate`): the step
        sums their gradients under ``lax.scan``, then updates and advances the controller once.
      loss_weight: ``loss_weight(batch)``, what ``loss_fn`` averages over (the target-token
        count of a token-averaged loss), so accumulated micro-batches give exactly the full
        batch's gradient; ``None``: an example mean (every micro-batch weighs ``1/k``).

    ``specs`` and ``module_paths`` name modules (a stacked module once); ``paths`` names every
    (module, layer) *entry*, the order of `StepInfo`'s vectors and of the history.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        params: Params,
        cfg: AromaConfig,
        in_ndim: Mapping[str, int] | None = None,
        donate: bool = True,
        stacked: Mapping[str, int] | None = None,
        grad_accum: int = 1,
        loss_weight: Callable[[Any], Array] | None = None,
    ):
        self.cfg = cfg
        self.grad_accum = accumulate.check_steps(grad_accum)
        self.loss_weight = loss_weight
        self._batch_shards = 1  # how many ways the batch axis is split (`set_shardings`)
        self.method = cfg.plugin  # what the step asks the method (`aroma_jax.core.methods`)
        self.loss_fn = loss_fn
        self.stacked = dict(stacked or {})
        base, _ = split_params(params, cfg.train_patterns)
        self.specs: dict[str, ModuleSpec] = adapters_lib.find_targets(
            base, cfg.target_modules, in_ndim, self.stacked
        )
        self.module_paths = tuple(sorted(self.specs))
        self.paths = adapters_lib.entry_names(self.specs)
        self.entry_specs = adapters_lib.entry_specs(self.specs)
        # entry -> (module path, layer index; None when the module is not stacked)
        self.entry_origin = {
            e: (p, i if sp.stack else None)
            for p, sp in self.specs.items()
            for i, e in enumerate(sp.entries)
        }
        self.folded = frozenset(p for p, s in self.specs.items() if self._folds(s))
        self._warn_slot_cost()
        self.tx = optim.make_optimizer(cfg, self._lead_ndim)
        self._traces = 0
        self._donate = (0,) if donate else ()
        self._step = jax.jit(self._step_impl, donate_argnums=self._donate)

    def set_shardings(self, state_sharding: Any, batch_sharding: Any = None) -> None:
        """Compiles the step for a sharded state (a `TrainState` of shardings) and batch.

        The state's output sharding equals its input sharding, so the step never reshards
        between calls or recompiles; see `aroma_jax.core.sharding` for the rules that make them.
        """
        self._batch_shards = accumulate.shard_count(batch_sharding)
        self._step = jax.jit(
            self._step_impl,
            in_shardings=(state_sharding, batch_sharding),
            out_shardings=(state_sharding, None),
            donate_argnums=self._donate,
        )

    def _warn_slot_cost(self) -> None:
        # Unfolded (non-fp32) kernels apply all of their frozen slots in every step, so a large
        # derived capacity (a long run) costs compute, not just memory.
        unfolded = [
            e for p in self.module_paths if p not in self.folded for e in self.specs[p].entries
        ]
        columns = self.cfg.rank_capacity_derived * self.cfg.r
        if unfolded and self.method.grows and columns > SLOT_COST_COLUMNS:
            warnings.warn(
                f"{len(unfolded)} adapted kernels are not fp32, so their frozen factors are "
                f"applied every step with {columns} columns (rank_capacity "
                f"{self.cfg.rank_capacity or 'derived from max_steps'}: "
                f"{self.cfg.rank_capacity_derived} slots of r={self.cfg.r}); set "
                "aroma.rank_capacity to the rank you expect, e.g. 32 (a binding capacity stops "
                "growth, never training)",
                SlotCostWarning,
                stacklevel=3,
            )

    def _folds(self, spec: ModuleSpec) -> bool:
        if self.cfg.fold == "never" or not self.method.grows:
            return False
        fp32 = jnp.dtype(spec.kernel_dtype) == jnp.float32
        if self.cfg.fold == "always" and not fp32:
            raise ConfigError(
                f"invalid fold='always': kernel {spec.path!r} is {spec.kernel_dtype}, and folding "
                "into a non-fp32 kernel would round the update away; accepted: 'auto' or 'never'"
            )
        return fp32

    def _offsets(self) -> dict[str, tuple[int, int]]:
        """Module path -> (start, count) of its entries in the per-entry vectors."""
        out, start = {}, 0
        for p in self.module_paths:
            n = len(self.specs[p].entries)
            out[p] = (start, n)
            start += n
        return out

    def _lead_ndim(self, trainable: dict) -> dict:
        """Per trainable leaf: its leading layer axes (1 for a stacked module's, else 0)."""
        return {
            "pairs": {
                p: jax.tree.map(lambda _, p=p: len(self.specs[p].lead), pair)
                for p, pair in trainable["pairs"].items()
            },
            "extra": jax.tree.map(lambda _: 0, trainable["extra"]),
        }

    # ------------------------------------------------------------------ state
    def kernels(self, base: Mapping) -> dict[str, Array]:
        """The 2-D view of every target kernel in ``base`` (``(L, in, out)`` when stacked)."""
        out = {}
        for p, spec in self.specs.items():
            k = _get(base, p + "/kernel")
            out[p] = k.reshape(spec.lead + (spec.fan_in, spec.fan_out))
        return out

    def unstacked(self, adapters: AdapterState) -> AdapterState:
        """The adapters keyed by entry name (one layer each), as an unrolled model has them."""
        return adapters_lib.unstack(adapters, self.specs)

    def restacked(self, adapters: AdapterState) -> AdapterState:
        """The inverse of `unstacked`."""
        return adapters_lib.restack(adapters, self.specs)

    def init(self, params: Params, seed: int | None = None) -> TrainState:
        """A fresh state from the model's pretrained params.

        The state holds the given arrays without copying them, and the train step donates its
        state: evaluate the original model before training, or pass a copy.
        """
        seed = self.cfg.seed if seed is None else seed
        k_adapt, k_ctrl, k_rng = jax.random.split(jax.random.key(seed), 3)
        base, extra = split_params(params, self.cfg.train_patterns)
        kernels = self.kernels(base)
        adapters = adapters_lib.init(self.specs, self.cfg, k_adapt, kernels)
        opt_state = self.tx.init(self._trainable(adapters, extra))
        ctrl = controller.init(adapters, kernels, k_ctrl, self.folded)
        ctrl = ctrl._replace(method_state=self.method.init_state(self.cfg, adapters, kernels))
        return TrainState(base, extra, adapters, opt_state, ctrl, k_rng)

    @staticmethod
    def _trainable(adapters: AdapterState, extra: dict) -> dict:
        return {"pairs": adapters.pairs, "extra": extra}

    # ---------------------------------------------------------------- forward
    def modules(self, adapters: AdapterState, training: bool = False) -> dict:
        """What `inject.adapters_applied` needs: ``(pair, frozen or None when folded)``.

        Methods that never merge (LoRA, DoRA, AdaLoRA) only fill their frozen slot at
        `finalize`, so their train step skips the frozen part. The pair is the method's
        `Method.forward_pair` (AdaLoRA's ``(a * lambda, b)``).
        """
        use_frozen = not (training and not self.method.grows)
        out = {}
        for p in self.module_paths:
            skip = p in self.folded or not use_frozen
            pair = self.method.forward_pair(adapters.pairs[p])
            out[p] = (pair, None if skip else adapters.frozen[p])
        return out

    def with_stacked(
        self,
        params: dict,
        modules: dict,
        drop_key: Array | None = None,
        column_scale: Mapping[str, Array] | None = None,
    ) -> dict:
        """``params`` with the stacked modules' adapters (and DoRA's per-layer column scale)
        added as leaves beside their kernels.

        Under ``nn.scan`` the layer stack is one module traced once, so a path-keyed adapter
        cannot tell layers apart; leaves in the params tree are sliced per layer like the
        kernel, and `aroma_jax.core.inject` reads them from the Dense's own params.
        """
        stacked = [p for p in self.module_paths if self.specs[p].stack]
        if not stacked:
            return params
        keys = None
        if drop_key is not None:  # one dropout key per (module, layer)
            keys = jax.random.split(drop_key, len(stacked))
        for j, p in enumerate(stacked):
            pair, frozen = modules[p]
            node = dict(_get(params, p))
            node.update(inject.stacked_leaves(pair, frozen, (column_scale or {}).get(p)))
            if keys is not None:
                layer_keys = jax.random.split(keys[j], self.specs[p].stack)
                node[inject.DROP_KEY] = jax.random.key_data(layer_keys)
            params = _set(params, p, node)
        return params

    def column_scale(self, state: TrainState, adapters: AdapterState, training: bool = False):
        """The method's factor per module on the adapted output (DoRA's ``m / n``,
        `Method.column_scale`); ``None`` for the others."""
        return self.method.column_scale(self, state, adapters, training)

    @contextlib.contextmanager
    def applied(self, state: TrainState) -> Iterator[dict]:
        """Within the block, models see the adapters; yields the full params to apply them with.

        >>> # with trainer.applied(state) as params: logits = model.apply({"params": params}, x)
        """
        in_ndim = {p: s.in_ndim for p, s in self.specs.items()}
        cols = self.column_scale(state, state.adapters)
        modules = self.modules(state.adapters)
        with inject.adapters_applied(
            self._unstacked_only(modules),
            self.cfg.scale,
            in_ndim,
            column_scale=self._unstacked_cols(cols),
        ):
            params = merge_params(state.base, state.extra)
            yield self.with_stacked(params, modules, column_scale=cols)

    def _unstacked_only(self, modules: dict) -> dict:
        """Path-keyed adapters for unstacked modules; stacked ones travel in the params."""
        return {p: inject.IN_PARAMS if self.specs[p].stack else m for p, m in modules.items()}

    def _unstacked_cols(self, cols: Mapping[str, Array] | None) -> dict | None:
        """DoRA's path-keyed column scales (unstacked modules; stacked ones travel in params)."""
        if cols is None:
            return None
        return {p: c for p, c in cols.items() if not self.specs[p].stack}

    def _loss_and_grads(self, trainable: dict, state: TrainState, batch: Any, rng: Array):
        """The loss and its gradients over the whole batch, in ``grad_accum`` micro-batches.

        The method's extra loss (AdaLoRA's orthogonality) depends on the pairs only: with
        micro-batches it is added once, outside the scan, not once per micro-batch.
        """
        if self.grad_accum == 1:
            (loss, _), grads = jax.value_and_grad(self._loss, has_aux=True)(
                trainable, state, batch, rng
            )
            return loss, grads
        loss, grads = accumulate.accumulated_grads(
            lambda t, b, key: self._loss(t, state, b, key, with_extra=False)[0],
            trainable,
            batch,
            rng,
            self.grad_accum,
            self.loss_weight,
            self._batch_shards,
        )
        if self.method.extra_loss(self.cfg, trainable["pairs"]) is not None:
            extra, extra_grads = jax.value_and_grad(
                lambda t: self.method.extra_loss(self.cfg, t["pairs"])
            )(trainable)
            loss = loss + extra
            grads = jax.tree.map(jnp.add, grads, extra_grads)
        return loss, grads

    def _loss(
        self, trainable: dict, state: TrainState, batch: Any, rng: Array, with_extra: bool = True
    ):
        adapters = state.adapters._replace(pairs=trainable["pairs"])
        in_ndim = {p: s.in_ndim for p, s in self.specs.items()}
        dropout = None
        if self.cfg.adapter_dropout > 0:  # a separate stream, so rate 0 keeps the old ones
            rng, drop_rng = jax.random.split(rng)
            dropout = (self.cfg.adapter_dropout, drop_rng)
        cols = self.column_scale(state, adapters, training=True)
        modules = self.modules(adapters, training=True)
        params = merge_params(state.base, trainable["extra"])
        stack_key = None if dropout is None else jax.random.fold_in(dropout[1], 1)
        params = self.with_stacked(params, modules, stack_key, cols)
        with inject.adapters_applied(
            self._unstacked_only(modules),
            self.cfg.scale,
            in_ndim,
            dropout=dropout,
            column_scale=self._unstacked_cols(cols),
        ) as hits:
            out = self.loss_fn(params, batch, rng)
        missing = sorted(set(self.module_paths) - hits)
        if missing:
            raise ValueError(
                f"adapters for {missing} were never applied: these paths hold a kernel but no "
                "nn.Dense/nn.DenseGeneral module at that path ran inside loss_fn"
            )
        loss, aux = out if isinstance(out, tuple) else (out, None)
        extra = None
        if with_extra:  # AdaLoRA's orthogonality
            extra = self.method.extra_loss(self.cfg, trainable["pairs"])
        if extra is not None:
            loss = loss + extra
        return loss, aux

    # ------------------------------------------------------------------- step
    @property
    def compiles(self) -> int:
        """How many times the train step was traced (1 for a whole run)."""
        return self._traces

    def step(self, state: TrainState, batch: Any) -> tuple[TrainState, StepInfo]:
        return self._step(state, batch)

    def compile_step(self, state: TrainState, batch: Any) -> None:
        """Compiles the step for these shapes without running it (`step` reuses the program):
        processes that must start their first step together compile before they meet."""
        self._step.lower(state, batch).compile()

    def _step_impl(self, state: TrainState, batch: Any) -> tuple[TrainState, StepInfo]:
        self._traces += 1
        cfg, n, method = self.cfg, len(self.paths), self.method
        if method.grows:
            rng, step_rng, reset_rng, outer_keys = self.split_keys(state)
        else:
            rng, step_rng, reset_rng = jax.random.split(state.rng, 3)
        trainable = self._trainable(state.adapters, state.extra)
        loss, grads = self._loss_and_grads(trainable, state, batch, step_rng)
        live = ~state.ctrl.finished
        active = {
            "pairs": {
                p: jax.tree.map(lambda x, d=state.adapters.done[p]: _lead(~d & live, x), pair)
                for p, pair in trainable["pairs"].items()
            },
            "extra": jax.tree.map(lambda _: live, trainable["extra"]),
        }
        lr = optim.learning_rate(cfg, state.opt_state)
        # Only pairs reset at the latest outer step re-warm; heads keep their learning rate.
        # A pair merges at every outer step until its module is done or full (capacity), and a
        # full module never merges again: so merges < outer_count marks a pair that was not
        # reset (capacity-full), without a flag in the state (checkpoints keep their layout).
        # The one exception: a pair left exactly zero through an outer step (not merged, see
        # `controller.outer_step`) is not re-warmed after a later merge.
        rewarm = {
            "pairs": {
                p: jax.tree.map(
                    lambda x, p=p: _lead(state.adapters.merges[p] >= state.ctrl.outer_count, x),
                    pair,
                )
                for p, pair in trainable["pairs"].items()
            },
            "extra": jax.tree.map(lambda _: jnp.zeros((), bool), trainable["extra"]),
        }
        updates, opt_state = self.tx.update(
            grads, state.opt_state, trainable, active=active, rewarm=rewarm
        )
        trainable = jax.tree.map(lambda p, u: p + u.astype(p.dtype), trainable, updates)
        # The method's work after the update (AdaLoRA's budget), then the controller's.
        ctrl_method, pairs = method.after_update(
            cfg,
            state.ctrl.method_state,
            trainable["pairs"],
            grads["pairs"],
            state.ctrl.step,
            live,
            n,
        )
        trainable = {**trainable, "pairs": pairs}
        adapters = state.adapters._replace(pairs=trainable["pairs"])
        ctrl = state.ctrl._replace(
            step=state.ctrl.step + live.astype(jnp.int32),
            inner_t=state.ctrl.inner_t + live.astype(jnp.int32),
            method_state=ctrl_method,
        )

        # The pairs' norms, for eq. 5 and eq. 6: every step, outside both branches. They cost
        # one read of the (small) pairs; inside the branches they compiled twice, and on a TPU
        # mesh each copy reshards the pairs.
        now = controller.pair_norms(adapters) if method.grows else None

        # The method's inner check when due (AROMA's eq. 5).
        ctrl, checked, rho_in, inner_label = method.inner_check(ctrl, adapters, cfg, now, live, n)

        # Outer step (eq. 6, merge, re-init, reset) when triggered, for all modules at once.
        outer = controller.outer_due(ctrl, adapters, cfg)
        # "cap" only when the cap fired with some active module unconverged: a loop whose
        # every module converged at the capping step ended by eq. 5.
        all_conv = jnp.all(controller.converged_or_done(ctrl, adapters))
        by_cap = outer & (ctrl.inner_t >= cfg.inner_max_steps) & ~all_conv
        base = state.base
        if method.grows:
            ctrl, adapters, opt_state, base, info = self.outer_step_if(
                outer,
                ctrl,
                adapters,
                opt_state,
                base,
                trainable["extra"],
                outer_keys,
                reset_rng,
                now,
            )
        else:
            info = controller.no_outer_info(n)

        finished = ctrl.step >= cfg.max_steps
        if method.trains_adapters:  # head-only runs have every module "done" from the start
            finished = finished | controller.all_done(adapters)
        ctrl = ctrl._replace(finished=finished)
        new_state = TrainState(base, trainable["extra"], adapters, opt_state, ctrl, rng)
        ranks = method.rank_vector(cfg, ctrl, adapters)
        step_info = StepInfo(
            step=ctrl.step,
            loss=loss,
            lr=lr,
            checked=checked,
            rho_in=rho_in,
            outer=outer,
            rho_out=info.rho_out,
            merged=info.merged,
            newly_done=info.newly_done,
            ranks=ranks,
            finished=finished,
            by_cap=by_cap,
            converged=info.converged,
            full=info.full,
            inner_label=inner_label,
        )
        return new_state, step_info

    @staticmethod
    def split_keys(state: TrainState) -> tuple[Array, Array, Array, tuple[Array, Array]]:
        """``(next rng, step rng, reset rng, (controller's next key, fresh pairs' key))``.

        The step's key and the controller's split together: XLA:CPU compiles every Threefry
        call as its own loop. With JAX's (default) partitionable Threefry,
        ``split(k, 3)[:2] == split(k)``, so both streams stay what they were.
        """
        both = jnp.stack([state.rng, state.ctrl.key])
        keys = jax.vmap(lambda k: jax.random.split(k, 3))(both)
        (rng, step_rng, reset_rng), (ctrl_key, fresh_key) = keys[0], keys[1][:2]
        return rng, step_rng, reset_rng, (ctrl_key, fresh_key)

    def outer_step_if(
        self,
        outer: Array,
        ctrl: controller.ControllerState,
        adapters: AdapterState,
        opt_state: optim.WrappedState,
        base: dict,
        extra: dict,
        keys: tuple[Array, Array],
        reset_rng: Array,
        now: Mapping[str, Array],
    ) -> tuple[controller.ControllerState, AdapterState, optim.WrappedState, dict, Any]:
        """The outer step under ``lax.cond(outer, ...)``: eq. 6, merge and re-init
        (`controller.outer_step`), then the merged pairs' optimizer-state reset.

        ``keys``: the controller's next key and the fresh pairs' key (`split_keys`); ``now``:
        the pairs' `controller.pair_norms`. Returns ``(ctrl, adapters, opt_state, base, info)``,
        ``base`` with the folded (fp32) kernels updated.
        """
        kernels = self.kernels(base)
        folded = {p: kernels[p] for p in self.folded}

        def do_outer(operands):
            ctrl_, adapters_, opt_, folded_ = operands
            ctrl_, adapters_, new_k, info = controller.outer_step(
                ctrl_,
                adapters_,
                {**kernels, **folded_},
                self.specs,
                self.cfg,
                self.folded,
                keys=keys,
                now=now,
            )
            merged = {  # per module: a scalar, or (L,) for a stacked one
                p: info.merged[i : i + n].reshape(self.specs[p].lead)
                for p, (i, n) in self._offsets().items()
            }
            mask = {
                "pairs": {
                    p: jax.tree.map(lambda x, p=p: _lead(merged[p], x), adapters_.pairs[p])
                    for p in self.module_paths
                },
                "extra": jax.tree.map(lambda _: jnp.zeros((), bool), extra),
            }
            keep = None
            if self.cfg.reset == "prune":  # drawn per (module, layer): stacked == unrolled
                keep = {
                    "pairs": adapters_lib.prune_keep(
                        reset_rng, self.specs, adapters_.pairs, self.cfg.prune_ratio
                    ),
                    "extra": jax.tree.map(lambda x: jnp.ones(x.shape, bool), extra),
                }
            opt_ = optim.reset(
                self.tx,
                opt_,
                mask,
                reset_rng,
                self._trainable(adapters_, extra),
                self.cfg.reset,
                self.cfg.prune_ratio,
                keep=keep,
            )
            return (ctrl_, adapters_, opt_, new_k), info

        def skip(operands):
            return operands, controller.no_outer_info(len(self.paths))

        (ctrl, adapters, opt_state, folded), info = lax.cond(
            outer, do_outer, skip, (ctrl, adapters, opt_state, folded)
        )
        for p, k in folded.items():
            spec = self.specs[p]
            base = _set(base, p + "/kernel", k.reshape(spec.lead + spec.kernel_shape))
        return ctrl, adapters, opt_state, base, info

    # ---------------------------------------------------------------- finish
    def finalize(self, state: TrainState) -> TrainState:
        """Ends a run: the pair each still-active module trains is merged or dropped.

        AROMA checks that pair by eq. 6 like at any outer step (`controller.eq6`): merged if it
        passes, dropped if it fails (the module then ends as if eq. 6 had stopped it there), so
        a reported rank counts only pairs that passed eq. 6. ReLoRA merges it; LoRA, DoRA and
        AdaLoRA merge their one pair. A zero pair is never merged. The model's function changes
        only by the dropped pairs; afterwards every module is done, ``merges * r`` is its final
        rank and the frozen factors (plus folded kernels) hold the whole update.
        """
        return self._finalize(state)[0]

    def final_pairs(self, state: TrainState) -> dict[str, dict[str, Any]]:
        """What `finalize` does with each entry's last pair: ``{"rho_out", "action"}``, action
        ``merged``, ``dropped`` (failed eq. 6 at ``max_steps``), ``zero`` (never moved: not
        merged) or ``stopped`` (eq. 6 stopped the module during training; ``rho_out`` None)."""
        _, (rho, stop, write, done) = self._finalize(state)
        rho, stop, write, done = (
            {e: np.asarray(v) for e, v in self.per_entry(jax.device_get(x)).items()}
            for x in (rho, stop, write, done)
        )
        out = {}
        for e in self.paths:
            if done[e]:
                out[e] = {"rho_out": None, "action": "stopped"}
                continue
            action = "merged" if write[e] else ("dropped" if stop[e] else "zero")
            out[e] = {"rho_out": float(rho[e]), "action": action}
        return out

    def _finalize(self, state: TrainState) -> tuple[TrainState, tuple[dict, ...]]:
        adapters, base = state.adapters, state.base
        cfg, method = self.cfg, self.method
        pairs, frozen, merges, done = {}, {}, {}, {}
        rhos, stops, writes, was_done = {}, {}, {}, {}

        def one(pair, fz, m, d, local, kernel, base_sq, folds):
            final_local, stop_local = local
            final = method.final_pair(pair, final_local)  # AdaLoRA: the latest allocation's
            pair_norm = norms.product_norm(final.a, final.b)
            nonzero = method.final_nonzero(final, pair_norm)
            rho, stop, _ = controller.eq6(pair_norm, fz, m, kernel, base_sq, cfg, folds, stop_local)
            write = ~d & nonzero & ~stop & (m < cfg.rank_capacity_derived)
            new_fz = controller.write_slot(fz, final, m, cfg.pair_rank, write)
            if folds:
                delta = (cfg.scale * pair.a) @ pair.b
                kernel = jnp.where(write, kernel + delta.astype(kernel.dtype), kernel)
            # DoRA's magnitude (and AdaLoRA's lambda) stay: the frozen slot holds the pair only.
            cleared = pair._replace(a=jnp.zeros_like(pair.a), b=jnp.zeros_like(pair.b))
            out = (cleared, new_fz, m + write.astype(jnp.int32), jnp.ones_like(d), kernel)
            return out + (rho, ~d & stop, write, d)

        kernels = self.kernels(base)
        for p in self.module_paths:
            spec, folds = self.specs[p], p in self.folded
            fn = controller.per_layer(
                lambda *xs, folds=folds: one(*xs, folds=folds), len(spec.lead)
            )
            (
                pairs[p],
                frozen[p],
                merges[p],
                done[p],
                k,
                rhos[p],
                stops[p],
                writes[p],
                was_done[p],
            ) = fn(
                adapters.pairs[p],
                adapters.frozen[p],
                adapters.merges[p],
                adapters.done[p],
                (
                    method.final_local(state.ctrl.method_state, p),
                    method.outer_local(state.ctrl.method_state, p),
                ),
                kernels[p],
                state.ctrl.base_sq[p],
            )
            if folds:
                base = _set(base, p + "/kernel", k.reshape(spec.lead + spec.kernel_shape))
        new = state._replace(base=base, adapters=AdapterState(pairs, frozen, merges, done))
        return new, (rhos, stops, writes, was_done)

    def per_entry(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Entry name -> its value: ``values[module]``, or its layer's row for a stacked module."""
        return {
            e: values[p] if i is None else values[p][i] for e, (p, i) in self.entry_origin.items()
        }

    def ranks(self, state: TrainState) -> dict[str, int]:
        """Entry name -> its rank (`Method.host_ranks`)."""
        return self.method.host_ranks(self, state)
