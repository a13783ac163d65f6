"""AdaLoRA (Zhang et al. 2023; PEFT's ``AdaLoraConfig``): SVD-form pairs pruned to a budget.

Each target module's update is ``s * P diag(lambda) Q`` with ``P = a: (in, r)``,
``lambda = singular: (r,)`` and ``Q = b: (r, out)`` (PEFT's ``lora_A.T``, ``lora_E`` and
``lora_B.T``), ``r = init_r`` and ``s = alpha / (init_r + 1e-5)``. Training adds the
orthogonality regulariser ``orth_reg_weight * mean(|P^T P - I|_F, |Q Q^T - I|_F)`` to the loss.

After every optimizer update the rank allocator (PEFT's ``RankAllocator``, called with
``global_step`` = the number of earlier steps) runs inside the compiled step:

* importance of every entry of ``P``, ``lambda`` and ``Q``: ``I = |theta * grad|``, smoothed
  ``I_bar = b1 I_bar + (1 - b1) I`` (sensitivity), ``U = b2 U + (1 - b2) |I - I_bar|``
  (uncertainty); a triplet's score is ``I_bar U`` of its singular value plus the means over its
  ``P`` column and ``Q`` row;
* the budget (total kept triplets) stays ``n * init_r`` for ``tinit`` steps, then falls
  cubically to ``n * target_r`` at ``max_steps - tfinal`` (`budget_table`, computed on the host
  exactly as PEFT's Python does); every ``delta_t`` steps the lowest-scoring triplets beyond the
  budget get ``lambda = 0`` (ties at the threshold go too, as in PEFT);
* at ``max_steps - tfinal`` the allocation is final: from then on the same triplets are masked
  after every update.

Pruning never changes a shape: it zeroes entries of ``lambda`` (as PEFT's ``masked_fill_``), and
`AllocatorState.kept` records the latest pattern (PEFT's ``rank_pattern``; a module's rank is
its count). A pruned ``lambda`` can grow back before the next allocation, also as in PEFT.

Example:
    >>> from aroma_jax.core.config import AromaConfig
    >>> from aroma_jax.core.methods import adalora
    >>> cfg = AromaConfig(target_modules=("q",), method="adalora", init_r=4, target_r=2,
    ...                   max_steps=10, tinit=2, tfinal=3)
    >>> budget, due = adalora.budget_table(cfg, n_modules=3)
    >>> budget.tolist()
    [12, 12, 12, 9, 7, 6, 6, 6, 6, 6, 6]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from aroma_jax.core import controller
from aroma_jax.core.adapters import AdapterState, ModuleSpec, Pair
from aroma_jax.core.config import AromaConfig, ConfigError
from aroma_jax.core.controller import per_layer
from aroma_jax.core.methods.base import Method, MethodConfig, factors, setting

Array = jax.Array


class AllocatorState(NamedTuple):
    """The rank allocator's state; ``ipt`` and ``unc`` are shaped like the pairs."""

    ipt: dict[str, Pair]  # sensitivity EMA (PEFT's exp_avg_ipt)
    unc: dict[str, Pair]  # uncertainty EMA (PEFT's exp_avg_unc)
    kept: dict[str, Array]  # (r,) bool ((L, r) stacked): the latest allocation (rank_pattern)


def fresh_pairs(key: Array, specs: Mapping[str, ModuleSpec], r: int) -> dict[str, Pair]:
    """PEFT's init: ``P``, ``Q`` normal with std 0.02, ``lambda = 0`` (the update starts at 0).

    Each (module, layer) entry draws from the key folded with its index in entry order, so a
    layer stack gets the same values as the same layers unrolled (one target module per layer).
    """
    out, i = {}, 0
    for p in sorted(specs):
        spec = specs[p]
        layers_a, layers_b = [], []
        for _ in spec.entries:
            ka, kb = jax.random.split(jax.random.fold_in(key, i))
            layers_a.append(0.02 * jax.random.normal(ka, (spec.fan_in, r), jnp.float32))
            layers_b.append(0.02 * jax.random.normal(kb, (r, spec.fan_out), jnp.float32))
            i += 1
        a, b = (jnp.stack(x) if spec.stack else x[0] for x in (layers_a, layers_b))
        out[p] = Pair(a, b, singular=jnp.zeros(spec.lead + (r,), jnp.float32))
    return out


def init(pairs: Mapping[str, Pair]) -> AllocatorState:
    """Zero EMAs and every triplet kept (PEFT's allocator before its first allocation)."""

    def zeros() -> dict[str, Pair]:  # separate buffers: the train step donates its state
        return {p: jax.tree.map(jnp.zeros_like, pair) for p, pair in pairs.items()}

    kept = {p: jnp.ones(pair.singular.shape, bool) for p, pair in pairs.items()}
    return AllocatorState(zeros(), zeros(), kept)


def effective(pair: Pair) -> Pair:
    """The plain pair the forward applies: ``(P diag(lambda), Q)`` (any leading layer axes)."""
    return Pair(pair.a * pair.singular[..., None, :], pair.b)


def orth_penalty(pairs: Mapping[str, Pair]) -> Array:
    """PEFT's regulariser: the mean of ``|P^T P - I|_F`` and ``|Q Q^T - I|_F`` over all
    (module, layer) entries; a layer stack ``(L, in, r)`` counts as its ``L`` layers."""

    def norms(a, b):  # one entry
        eye = jnp.eye(a.shape[-1], dtype=jnp.float32)
        return jnp.linalg.norm(a.T @ a - eye), jnp.linalg.norm(b @ b.T - eye)

    terms, count = [], 0
    for p in sorted(pairs):
        a, b = pairs[p].a.astype(jnp.float32), pairs[p].b.astype(jnp.float32)
        na, nb = per_layer(norms, a.ndim - 2)(a, b)  # per layer of a stack
        terms += [jnp.sum(na), jnp.sum(nb)]
        count += na.size + nb.size
    return sum(terms) / count


def budget_table(cfg: AromaConfig, n_modules: int) -> tuple[np.ndarray, np.ndarray]:
    """(budget, allocation due) for every ``global_step`` in ``[0, max_steps]``.

    PEFT's ``budget_schedule`` evaluated in Python floats on the host, so the compiled step
    reads the same integers PEFT computes (an fp32 cubic could round across an integer).
    """
    init_bgt, target_bgt = cfg.init_r * n_modules, cfg.target_r * n_modules
    total, tinit, tfinal = cfg.max_steps, cfg.tinit, cfg.tfinal
    budget = np.zeros(total + 1, np.int32)
    due = np.zeros(total + 1, bool)
    for step in range(total + 1):
        if step <= tinit:
            budget[step], due[step] = init_bgt, False
        elif step > total - tfinal:
            budget[step], due[step] = target_bgt, True
        else:
            mul = 1 - (step - tinit) / (total - tfinal - tinit)
            budget[step] = int((init_bgt - target_bgt) * (mul**3) + target_bgt)
            due[step] = step % cfg.delta_t == 0
    return budget, due


def update_importance(
    state: AllocatorState, pairs: Mapping[str, Pair], grads: Mapping[str, Pair], cfg: AromaConfig
) -> AllocatorState:
    """One EMA step of sensitivity and uncertainty for every entry (PEFT's ``update_ipt``)."""
    b1, b2 = cfg.ipt_beta1, cfg.ipt_beta2
    ipt, unc = {}, {}
    for p in sorted(pairs):

        def one(theta, g, avg, u):
            now = jnp.abs(theta * g)
            avg = b1 * avg + (1 - b1) * now
            return avg, b2 * u + (1 - b2) * jnp.abs(now - avg)

        pair, grad = pairs[p], grads[p]
        out = [
            one(
                getattr(pair, f),
                getattr(grad, f),
                getattr(state.ipt[p], f),
                getattr(state.unc[p], f),
            )
            for f in ("a", "b", "singular")
        ]
        ipt[p] = Pair(out[0][0], out[1][0], singular=out[2][0])
        unc[p] = Pair(out[0][1], out[1][1], singular=out[2][1])
    return state._replace(ipt=ipt, unc=unc)


def triplet_scores(state: AllocatorState) -> dict[str, Array]:
    """Per module ``(r,)`` (``(L, r)`` stacked): score of lambda_i + (mean score of P's column i
    + of Q's row i)."""
    out = {}
    for p in sorted(state.ipt):
        s = jax.tree.map(lambda i, u: i * u, state.ipt[p], state.unc[p])
        out[p] = s.singular + (jnp.mean(s.a, axis=-2) + jnp.mean(s.b, axis=-1))
    return out


def mask_to_budget(state: AllocatorState, budget: Array) -> dict[str, Array]:
    """Which triplets survive a budget: all but the ``init - budget`` lowest scores (ties at the
    threshold are pruned too, PEFT's ``<= kthvalue``); ``budget >= init`` keeps everything."""
    scores = triplet_scores(state)
    flat = jnp.concatenate([jnp.ravel(scores[p]) for p in sorted(scores)])
    k = flat.shape[0] - budget  # PEFT: kthvalue(k = init_bgt - budget)
    threshold = jnp.sort(flat)[jnp.clip(k - 1, 0, flat.shape[0] - 1)]
    return {p: ~((k > 0) & (s <= threshold)) for p, s in scores.items()}


def allocate(
    state: AllocatorState,
    pairs: Mapping[str, Pair],
    grads: Mapping[str, Pair],
    global_step: Array,
    cfg: AromaConfig,
    tables: tuple[Array, Array],
) -> tuple[AllocatorState, dict[str, Pair]]:
    """PEFT's ``update_and_allocate(global_step)`` after an update: returns the new allocator
    state and the pairs with the pruned singular values zeroed.

    ``tables`` is `budget_table` as device arrays; ``global_step`` counts the steps before this
    one (PEFT's training loops pass 0 after the first update).
    """
    budget_t, due_t = tables
    final_at = cfg.max_steps - cfg.tfinal
    g = jnp.clip(global_step, 0, cfg.max_steps)
    budgeting = global_step < final_at
    updated = update_importance(state, pairs, grads, cfg)
    state = jax.tree.map(lambda new, old: jnp.where(budgeting, new, old), updated, state)
    fix = global_step == final_at  # the final allocation (PEFT: force_mask, then reset_ipt)
    reallocate = (budgeting & due_t[g]) | fix
    fresh = mask_to_budget(state, budget_t[g])
    kept = {p: jnp.where(reallocate, fresh[p], state.kept[p]) for p in state.kept}
    # Past the final allocation the fixed pattern masks every step (mask_using_rank_pattern).
    apply = reallocate | (global_step > final_at)
    new_pairs = {
        p: pair._replace(singular=jnp.where(apply & ~kept[p], 0.0, pair.singular))
        for p, pair in pairs.items()
    }
    zero = lambda t: jax.tree.map(lambda x: jnp.where(fix, jnp.zeros_like(x), x), t)  # noqa: E731
    state = AllocatorState(zero(state.ipt), zero(state.unc), kept)
    return state, new_pairs


def ranks(state: AllocatorState) -> dict[str, Array]:
    """Kept triplets per module (int32 scalars; ``(L,)`` for a layer stack)."""
    return {p: jnp.sum(k.astype(jnp.int32), axis=-1) for p, k in state.kept.items()}


@dataclasses.dataclass(frozen=True)
class AdaLoRAConfig(MethodConfig):
    """AdaLoRA's settings: the shared ones and PEFT's ``AdaLoraConfig`` budget fields
    (`aroma_jax.core.config.AromaConfig` documents each)."""

    init_r: int = setting("init_r")
    target_r: int = setting("target_r")
    tinit: int = setting("tinit")
    tfinal: int = setting("tfinal")
    delta_t: int = setting("delta_t")
    ipt_beta1: float = setting("ipt_beta1")
    ipt_beta2: float = setting("ipt_beta2")
    orth_reg_weight: float = setting("orth_reg_weight")


class AdaLoRA(Method):
    """AdaLoRA as a method: SVD-form pairs of ``init_r`` triplets, the orthogonality penalty,
    and the rank allocator after every update; its state is an `AllocatorState`."""

    name = "adalora"
    config_class = AdaLoRAConfig
    SETTINGS = ("init_r", "target_r", "tinit", "tfinal", "delta_t", "ipt_beta1", "ipt_beta2")
    SETTINGS += ("orth_reg_weight", "max_steps")

    def validate(self, cfg: AromaConfig) -> None:
        if cfg.target_r > cfg.init_r:
            raise ConfigError(
                f"invalid target_r={cfg.target_r!r}: accepted an integer <= init_r ({cfg.init_r})"
            )
        if cfg.tinit >= cfg.max_steps - cfg.tfinal:
            raise ConfigError(
                f"invalid tinit={cfg.tinit!r}: accepted fewer than max_steps - tfinal "
                f"({cfg.max_steps} - {cfg.tfinal}) steps, so a budgeting phase is left "
                "(PEFT's rule)"
            )

    def pair_rank(self, cfg: AromaConfig) -> int:
        return cfg.init_r

    def scale(self, cfg: AromaConfig) -> float:
        return cfg.alpha / (cfg.init_r + 1e-5)  # PEFT: scaling / (ranknum + 1e-5)

    def init_pairs(
        self,
        key: Array,
        specs: Mapping[str, ModuleSpec],
        cfg: AromaConfig,
        kernels: Mapping[str, Array] | None,
    ) -> dict[str, Pair]:
        return fresh_pairs(key, specs, cfg.init_r)

    def init_state(
        self, cfg: AromaConfig, adapters: AdapterState, kernels: Mapping[str, Array]
    ) -> AllocatorState:
        return init(adapters.pairs)

    def forward_pair(self, pair: Pair) -> Pair:
        return effective(pair)

    def extra_loss(self, cfg: AromaConfig, pairs: Mapping[str, Pair]) -> Array | None:
        if cfg.orth_reg_weight > 0:  # PEFT adds it to the model's loss, so it is reported too
            return cfg.orth_reg_weight * orth_penalty(pairs)
        return None

    def after_update(
        self,
        cfg: AromaConfig,
        method_state: AllocatorState,
        pairs: dict[str, Pair],
        grads: Mapping[str, Pair],
        step: Array,
        live: Array,
        n_entries: int,
    ) -> tuple[AllocatorState, dict[str, Pair]]:
        """PEFT's ``update_and_allocate``; the budget per global step is computed on the host
        once, when the step is traced (`budget_table`)."""
        tables = tuple(jnp.asarray(t) for t in budget_table(cfg, n_entries))
        alloc, new_pairs = allocate(method_state, pairs, grads, step, cfg, tables)
        keep = lambda new, old: jnp.where(live, new, old)  # noqa: E731
        return jax.tree.map(keep, alloc, method_state), jax.tree.map(keep, new_pairs, pairs)

    def rank_vector(
        self, cfg: AromaConfig, ctrl: controller.ControllerState, adapters: AdapterState
    ) -> Array:
        return controller.stack_entries(ranks(ctrl.method_state))  # kept triplets

    def host_ranks(self, trainer: Any, state: Any) -> dict[str, int]:
        kept = jax.device_get(ranks(state.ctrl.method_state))
        return {e: int(k) for e, k in trainer.per_entry(kept).items()}

    def pair_params(self, fan_in: int, fan_out: int, r: int, init_r: int | None = None) -> int:
        """``init_r`` triplets (``P``, ``lambda``, ``Q``) whatever the budget keeps: pruned ones
        still move under the orthogonality penalty, and PEFT counts them as trainable."""
        k = init_r if init_r is not None else r
        return k * (fan_in + fan_out) + k

    def final_local(self, method_state: AllocatorState, path: str) -> Array:
        return method_state.kept[path]

    def final_pair(self, pair: Pair, local: Array) -> Pair:
        return effective(pair._replace(singular=pair.singular * local))  # the latest allocation

    def save_tensors(self, trainer: Any, state: Any) -> dict[str, np.ndarray]:
        kept = trainer.per_entry(jax.device_get(state.ctrl.method_state.kept))
        return {f"kept/{p}": np.asarray(kept[p], np.uint8) for p in trainer.paths}

    def save_meta(self, cfg: AromaConfig) -> dict[str, Any]:
        return {"adalora": {name: getattr(cfg, name) for name in self.SETTINGS}}

    def restore(self, trainer: Any, tensors: Mapping[str, np.ndarray], ctrl: Any) -> Any:
        kept = {}
        for module in trainer.module_paths:
            rows = [tensors[f"kept/{e}"].astype(bool) for e in trainer.specs[module].entries]
            kept[module] = jnp.asarray(np.stack(rows) if trainer.specs[module].stack else rows[0])
        return ctrl._replace(method_state=ctrl.method_state._replace(kept=kept))

    def peft_files(
        self,
        tensors: Mapping[str, np.ndarray],
        meta: Mapping[str, Any],
        torch_name: Callable[[str], str],
    ) -> tuple[dict, dict[str, np.ndarray]]:
        """PEFT's AdaLoRA layout: per module ``lora_A (k, in)``, ``lora_E (k, 1)``,
        ``lora_B (out, k)`` for the ``k`` kept triplets, and ``rank_pattern`` over all
        ``init_r``.

        The finished factors hold ``P diag(lambda)`` and ``Q``, so ``lora_E`` is written as ones
        and ``lora_A`` carries the singular values: PEFT computes the same product. PEFT scales
        by ``lora_alpha / (init_r + 1e-5)``, our scale too, so ``lora_alpha`` is ``alpha``.
        """
        settings = meta["adalora"]
        state: dict[str, np.ndarray] = {}
        rank_pattern: dict[str, list[bool]] = {}
        targets = []
        for path in meta["paths"]:
            a, b = factors(tensors, path)
            kept = np.asarray(tensors[f"kept/{path}"]).astype(bool)
            if a.shape[1] == 0 or not kept.any():
                continue  # nothing kept (or never written): the module is not adapted
            name = torch_name(path)
            prefix = f"base_model.model.{name}"
            state[f"{prefix}.lora_A"] = np.ascontiguousarray(a[:, kept].T.astype(np.float32))
            state[f"{prefix}.lora_E"] = np.ones((int(kept.sum()), 1), np.float32)
            state[f"{prefix}.lora_B"] = np.ascontiguousarray(b[kept].T.astype(np.float32))
            targets.append(name)
            rank_pattern[f"{name}.lora_E"] = kept.tolist()
        config = {
            "peft_type": "ADALORA",
            "lora_alpha": float(meta["alpha"]),
            "target_modules": sorted(targets),
            "init_r": settings["init_r"],
            "target_r": settings["target_r"],
            "tinit": settings["tinit"],
            "tfinal": settings["tfinal"],
            "deltaT": settings["delta_t"],
            "beta1": settings["ipt_beta1"],
            "beta2": settings["ipt_beta2"],
            "orth_reg_weight": settings["orth_reg_weight"],
            "total_step": settings["max_steps"],
            "rank_pattern": rank_pattern,
            "use_dora": False,
        }
        return config, state
