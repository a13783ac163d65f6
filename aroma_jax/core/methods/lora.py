"""LoRA (Hu et al. 2022): one fixed-rank pair per module, merged once by `finalize`.

Every default of `aroma_jax.core.methods.base.Method` is LoRA's; what is LoRA's own is its rank
curve: the pair trains rank ``r`` in every module from the first step, while the merged rank the
steps record stays 0 until the final merge.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from aroma_jax.core.methods.base import Method, MethodConfig, import_as_pair


@dataclasses.dataclass(frozen=True)
class LoRAConfig(MethodConfig):
    """LoRA's settings: the shared ones only (``r``, ``alpha``, ``adapter_dropout``, ...)."""


class LoRA(Method):
    name = "lora"
    config_class = LoRAConfig
    import_lora = staticmethod(import_as_pair)  # a PEFT LoRA adapter continues as the pair

    def total_rank_series(self, recorded: np.ndarray, r: int, n_modules: int) -> np.ndarray:
        return np.full(np.shape(recorded), r * n_modules, np.int64)
