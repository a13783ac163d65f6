"""AROMA (EMNLP 2025): rank-one pairs that grow per module until eq. 6 stops them.

Inner loop: every ``inner_check_every`` steps eq. 5 (the signed relative change of ``|a b|_F``,
`aroma_jax.core.controller.inner_check`) sets a sticky inner-converged label when it falls below
``inner_tol``. Outer step (global): when every active module is inner-converged, or after
``inner_max_steps``. There, per module, eq. 6 (``|s a b| / |W0 + dW| < outer_tol``) stops the
module (its pair is discarded), otherwise the pair is merged and re-initialised
(`aroma_jax.core.controller.outer_step`). ``keep_first_pair`` skips the stop at a module's first
outer step (the authors' code). A growth rule of one's own subclasses `Aroma` and overrides
`stop` (`aroma_jax.examples.custom_method`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from aroma_jax.core import controller
from aroma_jax.core.adapters import AdapterState
from aroma_jax.core.config import AromaConfig
from aroma_jax.core.methods.base import GrowingConfig, Method, import_as_merged, setting

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AromaMethodConfig(GrowingConfig):
    """AROMA's settings: the shared ones, a growing method's, and eq. 5 / eq. 6's
    (`aroma_jax.core.config.AromaConfig` documents each)."""

    inner_tol: float = setting("inner_tol")
    inner_check_every: int = setting("inner_check_every")
    outer_tol: float = setting("outer_tol")
    keep_first_pair: bool = setting("keep_first_pair")


class Aroma(Method):
    name = "aroma"
    grows = True
    config_class = AromaMethodConfig
    import_lora = staticmethod(import_as_merged)  # a PEFT adapter: merged rank to grow on

    def inner_check(
        self,
        ctrl: controller.ControllerState,
        adapters: AdapterState,
        cfg: AromaConfig,
        now: Mapping[str, Array] | None,
        live: Array,
        n_entries: int,
    ) -> tuple[controller.ControllerState, Array, Array, Array]:
        # Computed every step and kept only at check steps: a handful of per-module scalars,
        # selected rather than branched to (a `lax.cond` here cost XLA:CPU a second of compile).
        nan_n = jnp.full((n_entries,), jnp.nan, jnp.float32)
        checked = live & (ctrl.inner_t % cfg.inner_check_every == 0)
        new_ctrl, new_rho = controller.inner_check(ctrl, adapters, cfg, now=now)
        pick = lambda new, old: jnp.where(checked, new, old)  # noqa: E731
        ctrl = ctrl._replace(
            prev_norm=jax.tree.map(pick, new_ctrl.prev_norm, ctrl.prev_norm),
            inner_conv=jax.tree.map(pick, new_ctrl.inner_conv, ctrl.inner_conv),
        )
        rho_in = pick(new_rho, nan_n)
        return ctrl, checked, rho_in, checked & (rho_in < cfg.inner_tol)  # NaN (done): False

    def outer_due(
        self, ctrl: controller.ControllerState, adapters: AdapterState, cfg: AromaConfig
    ) -> Array:
        capped = ctrl.inner_t >= cfg.inner_max_steps
        all_conv = jnp.all(controller.converged_or_done(ctrl, adapters))
        return (all_conv | capped) & ~ctrl.finished

    def stop(
        self, cfg: AromaConfig, rho: Array, merges: Array, pair_norm: Array, local: Any
    ) -> tuple[Any, Any]:
        stop = rho < cfg.outer_tol
        # The authors' code exempts a module's first pair, but never a zero one: a module
        # whose pair never moved must not be reported at rank 1 with no update.
        if cfg.keep_first_pair:
            stop = stop & ((merges > 0) | (pair_norm == 0))
        return stop, local
