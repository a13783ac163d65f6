"""A growth rule the paper does not have, in one file: grow while eq. 6 holds up.

AROMA stops a module when eq. 6's ratio ``|s a b| / |W0 + dW|`` falls below a fixed
``outer_tol``. `GrowWhileRatioHolds` stops it *relative to itself*: a module keeps growing while
each new pair's ratio stays above ``fraction`` of its first pair's, so a module whose first pair
mattered a lot needs its later pairs to matter too, and a quiet module is judged by its own
scale rather than one threshold for all (``outer_tol`` stays as a floor, so a module whose first
pair changed nothing stops at its next outer step). Everything else (eq. 5's inner loop, the
merge, the re-init, the optimizer-state reset) is AROMA's, inherited.

It needs no edit of the package. Train it by its dotted path; its own setting, ``fraction``,
is a key of the run config's ``aroma:`` section (its config class, `GrowWhileConfig`):

    aroma-jax train --config tiny-roberta --output runs/grow \\
        --set aroma.method=aroma_jax.examples.custom_method:GrowWhileRatioHolds \\
        --set aroma.fraction=0.5

or, from Python, register it under a short name first:

    from aroma_jax.core import methods
    from aroma_jax.examples.custom_method import GrowWhileRatioHolds
    methods.register("grow-while", GrowWhileRatioHolds())
    cfg = AromaConfig(target_modules=("query", "value"), method="grow-while")

The rule's state is one number per module (one per layer of a scanned stack): its first pair's
eq. 6 ratio, NaN until its first outer step. It rides in ``ControllerState.method_state``, so it
is checkpointed and restored with the run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from aroma_jax.core.adapters import AdapterState
from aroma_jax.core.config import AromaConfig, ConfigError
from aroma_jax.core.methods.aroma import Aroma, AromaMethodConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GrowWhileConfig(AromaMethodConfig):
    """AROMA's settings and the rule's own: a module stops when its pair's eq. 6 ratio falls
    below ``fraction`` of its first pair's."""

    fraction: float = 0.5


class GrowWhileRatioHolds(Aroma):
    """AROMA whose stop rule is ``rho < fraction * rho_first``, or eq. 6's own ``rho <
    outer_tol`` (for a module whose first pair changed little), never at the first (nonzero)
    pair."""

    name = "grow-while-ratio-holds"
    config_class = GrowWhileConfig

    def validate(self, cfg: AromaConfig) -> None:
        fraction = self.settings(cfg).fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise ConfigError(f"invalid fraction={fraction!r}: accepted a number in (0, 1]")
        if not 0 < fraction <= 1:
            raise ConfigError(f"invalid fraction={fraction!r}: accepted a number in (0, 1]")

    def init_state(
        self, cfg: AromaConfig, adapters: AdapterState, kernels: Mapping[str, Array]
    ) -> dict[str, Array]:
        return {p: jnp.full(d.shape, jnp.nan, jnp.float32) for p, d in adapters.done.items()}

    def outer_local(self, method_state: dict[str, Array], path: str) -> Array:
        return method_state[path]

    def with_outer_locals(self, method_state: Any, local: Mapping[str, Array]) -> dict:
        return dict(local)

    def stop(
        self, cfg: AromaConfig, rho: Array, merges: Array, pair_norm: Array, local: Array
    ) -> tuple[Any, Any]:
        first = jnp.where(merges == 0, rho, local)  # the first pair's ratio, kept from then on
        below = (rho < self.settings(cfg).fraction * first) | (rho < cfg.outer_tol)
        # A zero pair is never merged (it would count a rank with no update), so it is no first
        # pair either: the floor stops a module whose pair never moved.
        return below & ((merges > 0) | (pair_norm == 0)), first
