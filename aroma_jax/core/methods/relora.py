"""ReLoRA (Lialin et al. 2023): merge the pair and re-initialise it every ``inner_max_steps``,
with no stopping criteria; the optimizer state of the merged pairs is reset (``cfg.reset``) and
the learning rate re-warmed, as at AROMA's outer steps."""

from __future__ import annotations

import dataclasses

import jax

from aroma_jax.core import controller
from aroma_jax.core.adapters import AdapterState
from aroma_jax.core.config import AromaConfig
from aroma_jax.core.methods.base import GrowingConfig, Method, import_as_merged


@dataclasses.dataclass(frozen=True)
class ReLoRAConfig(GrowingConfig):
    """ReLoRA's settings: the shared ones and a growing method's (``inner_max_steps`` is the
    reset period); no eq. 5 or eq. 6 thresholds."""


class ReLoRA(Method):
    name = "relora"
    grows = True
    config_class = ReLoRAConfig
    import_lora = staticmethod(import_as_merged)  # a PEFT adapter: merged rank to grow on

    def shortest_inner_loop(self, cfg: AromaConfig) -> int:
        return cfg.inner_max_steps  # every loop lasts exactly this long

    def outer_due(
        self, ctrl: controller.ControllerState, adapters: AdapterState, cfg: AromaConfig
    ) -> jax.Array:
        capped = ctrl.inner_t >= cfg.inner_max_steps
        return capped & ~ctrl.finished
