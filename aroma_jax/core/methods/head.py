"""Head-only training: no adapter is trained, only the config's ``train_patterns`` (PEFT's
``modules_to_save``), the baseline that tells what the adapters add."""

from __future__ import annotations

import dataclasses

from aroma_jax.core.methods.base import Method, MethodConfig


@dataclasses.dataclass(frozen=True)
class HeadConfig(MethodConfig):
    """Head-only's settings: the shared ones (``train_patterns`` is what it trains)."""


class HeadOnly(Method):
    name = "head"
    config_class = HeadConfig
    # Every module is done from the start, so done modules do not end the run: only max_steps.
    trains_adapters = False

    def pair_params(self, fan_in: int, fan_out: int, r: int, init_r: int | None = None) -> int:
        return 0
