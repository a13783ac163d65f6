"""DoRA (Liu et al. 2024; PEFT's ``use_dora``): a magnitude times a normalised direction.

For a kernel ``W0: (in, out)`` and a LoRA pair ``a: (in, r)``, ``b: (r, out)`` DoRA's adapted
kernel is ``W = m * (W0 + s a b) / n`` with a trainable magnitude ``m: (out,)`` (initialised to
the column norms of ``W0``) and ``n_j = |W0[:, j] + s (a b)[:, j]|`` the direction's norm per
output column (Flax kernels are ``(in, out)``, so PEFT's "row of weight" is our column). ``n`` is
treated as a constant in the backward pass (the DoRA paper's section 4.3, PEFT's ``detach``).

Nothing here forms an ``(in, out)`` matrix: ``n_j^2 = |W0_j|^2 + 2 s (a^T W0)_j . b_j +
s^2 b_j^T (a^T a) b_j``, with ``|W0_j|^2`` computed once (`column_sq_norms`) and the rest from
``a^T W0: (r, out)`` and ``a^T a: (r, r)``. The module's output is then, like PEFT's
``DoraLinearLayer.forward``, ``y = f * (x W0 + s (x a) b) + bias`` with ``f = m / n``, applied by
`aroma_jax.core.inject` from the base call's output (``(f - 1) * (y0 - bias)``), so the base
matmul is not repeated.

Example:
    >>> import jax.numpy as jnp
    >>> from aroma_jax.core.methods import dora
    >>> w0 = jnp.array([[3.0, 0.0], [4.0, 1.0]])  # column norms 5 and 1
    >>> col_sq = dora.column_sq_norms(w0)
    >>> a, b = jnp.zeros((2, 1)), jnp.zeros((1, 2))
    >>> dora.column_norms(col_sq, w0, a, b, 2.0).tolist()
    [5.0, 1.0]
    >>> dora.factor(jnp.array([10.0, 1.0]), col_sq, w0, a, b, 2.0).tolist()  # m / n
    [2.0, 1.0]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from aroma_jax.core import controller
from aroma_jax.core.adapters import AdapterState, ModuleSpec, Pair
from aroma_jax.core.methods.base import Method, MethodConfig, lora_peft_files

if TYPE_CHECKING:
    from aroma_jax.core.config import AromaConfig

Array = jax.Array


def column_sq_norms(w0: Array) -> Array:
    """``|W0[:, j]|^2`` per output column ``j`` of a 2-D kernel ``(in, out)``, in fp32 (computed
    once); a layer stack ``(L, in, out)`` gives ``(L, out)``."""
    w0 = w0.astype(jnp.float32)
    return jnp.sum(w0 * w0, axis=-2)


def column_norms(col_sq: Array, w0: Array, a: Array, b: Array, scale: float) -> Array:
    """``|W0[:, j] + s (a b)[:, j]|`` for every ``j`` from factors (no ``(in, out)`` product).

    Args:
      col_sq: `column_sq_norms` of ``w0``.
      w0: the 2-D base kernel ``(in, out)``.
      a, b: the low-rank factors ``(in, k)`` and ``(k, out)`` (pair, or frozen slots and pair
        concatenated).
      scale: ``s``.
    """
    f32 = jnp.float32
    a, b = a.astype(f32), b.astype(f32)
    # (k, out): one pass over W0 with k vectors, like k extra tokens through the layer.
    atw = lax.dot_general(a, w0.astype(f32), (((0,), (0,)), ((), ())))
    cross = jnp.sum(atw * b, axis=0)
    gram = a.T @ a  # (k, k)
    ab_sq = jnp.sum(b * (gram @ b), axis=0)
    sq = col_sq + 2.0 * scale * cross + scale**2 * ab_sq
    # The expansion can round below zero only when the update cancels a column exactly.
    return jnp.sqrt(jnp.maximum(sq, 0.0))


def factor(magnitude: Array, col_sq: Array, w0: Array, a: Array, b: Array, scale: float) -> Array:
    """DoRA's per-column factor ``f = m / n`` with ``n`` detached (gradients reach ``m`` only
    through this factor; ``a`` and ``b`` get theirs through the low-rank term it multiplies)."""
    n = lax.stop_gradient(column_norms(col_sq, w0, a, b, scale))
    safe = jnp.maximum(n, jnp.finfo(jnp.float32).tiny)
    return magnitude.astype(jnp.float32) / safe


def init_magnitude(w0: Array) -> Array:
    """The magnitude at initialisation (``b = 0``): the column norms of ``W0``, as PEFT."""
    return jnp.sqrt(column_sq_norms(w0))


def merged_kernel(w0: Array, a: Array, b: Array, magnitude: Array, scale: float) -> Array:
    """The dense adapted kernel ``m * (W0 + s a b) / n`` for export (never in the train step)."""
    direction = w0.astype(jnp.float32) + scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))
    n = jnp.linalg.norm(direction, axis=0)
    return direction * (magnitude.astype(jnp.float32) / n)[None, :]


@dataclasses.dataclass(frozen=True)
class DoRAConfig(MethodConfig):
    """DoRA's settings: LoRA's (the magnitude has none of its own)."""


class DoRA(Method):
    """DoRA as a method: LoRA's pair plus the magnitude ``m`` (in `Pair.magnitude`); its state is
    ``|W0_j|^2`` per module (computed once; the step adds the pair's terms)."""

    name = "dora"
    config_class = DoRAConfig

    def init_pairs(
        self,
        key: Array,
        specs: Mapping[str, ModuleSpec],
        cfg: AromaConfig,
        kernels: Mapping[str, Array] | None,
    ) -> dict[str, Pair]:
        if kernels is None:
            raise ValueError("method 'dora' needs the base kernels to initialise its magnitude")
        pairs = super().init_pairs(key, specs, cfg, kernels)
        return {p: pair._replace(magnitude=init_magnitude(kernels[p])) for p, pair in pairs.items()}

    def init_state(
        self, cfg: AromaConfig, adapters: AdapterState, kernels: Mapping[str, Array]
    ) -> dict[str, Array]:
        return {p: column_sq_norms(kernels[p]) for p in kernels}

    def column_scale(
        self, trainer: Any, state: Any, adapters: AdapterState, training: bool
    ) -> dict[str, Array]:
        """``m / n`` per module; ``n`` is the column norm of ``W0 + s * [A | a] @ [B; b]`` from
        factors, detached."""
        kernels = trainer.kernels(state.base)
        scale = trainer.cfg.scale
        out = {}
        for p, (pair, frozen) in trainer.modules(adapters, training).items():
            a, b = pair.a, pair.b
            if frozen is not None:
                a = jnp.concatenate([frozen.a, a], axis=-1)
                b = jnp.concatenate([frozen.b, b], axis=-2)
            mag = adapters.pairs[p].magnitude
            col_sq = state.ctrl.method_state[p]
            fn = controller.per_layer(
                lambda m, c, k, a, b: factor(m, c, k, a, b, scale), len(trainer.specs[p].lead)
            )
            out[p] = fn(mag, col_sq, kernels[p], a, b)
        return out

    def final_nonzero(self, final: Pair, pair_norm: Array) -> Array:
        return jnp.ones((), bool)  # DoRA adapts through m even when a b = 0

    def pair_params(self, fan_in: int, fan_out: int, r: int, init_r: int | None = None) -> int:
        return r * (fan_in + fan_out) + fan_out

    def merged_kernel(
        self,
        w: np.ndarray,
        a: np.ndarray,
        b: np.ndarray,
        tensors: Mapping[str, np.ndarray],
        path: str,
        meta: Mapping[str, Any],
    ) -> np.ndarray:
        """``m * (W0 + s A B) / n``, per output column."""
        return np.asarray(merged_kernel(w, a, b, tensors[f"magnitude/{path}"], meta["scale"]))

    def peft_files(
        self,
        tensors: Mapping[str, np.ndarray],
        meta: Mapping[str, Any],
        torch_name: Callable[[str], str],
    ) -> tuple[dict, dict[str, np.ndarray]]:
        return lora_peft_files(tensors, meta, torch_name, magnitude=True)
