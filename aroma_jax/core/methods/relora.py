"""ReLoRA (Lialin et al. 2023): merge the pair and re-initialise it every ``inner_max_steps``,
with no stopping criteria; the optimizer state of the merged pairs is reset (``cfg.reset``) and
the learning rate re-warmed, as at AROMA's outer steps."""

from __future__ import annotations

import jax

from aroma_jax.core import controller
from aroma_jax.core.adapters import AdapterState
from aroma_jax.core.config import AromaConfig
from aroma_jax.core.methods.base import Method


class ReLoRA(Method):
    name = "relora"
    grows = True

    def shortest_inner_loop(self, cfg: AromaConfig) -> int:
        return cfg.inner_max_steps  # every loop lasts exactly this long

    def outer_due(
        self, ctrl: controller.ControllerState, adapters: AdapterState, cfg: AromaConfig
    ) -> jax.Array:
        capped = ctrl.inner_t >= cfg.inner_max_steps
        return capped & ~ctrl.finished
