"""Rotary position embeddings for the LLaMA family, computed from positions (no table).

The angles are ``position * inv_freq`` evaluated in the graph for the positions actually used,
so a 131k-context config costs nothing extra at short sequence lengths (HF's Flax LLaMA
precomputes a ``(max_pos, head_dim)`` table per layer). ``rope_type`` ``llama3`` (LLaMA 3.1/3.2)
and ``linear`` rescale the frequencies as transformers does.

Example:
    >>> import jax.numpy as jnp
    >>> inv = inv_frequencies(8, 10000.0, {})
    >>> x = jnp.ones((1, 3, 2, 8))  # (batch, seq, heads, head_dim)
    >>> apply_rotary(x, jnp.arange(3)[None], inv).shape
    (1, 3, 2, 8)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def inv_frequencies(
    head_dim: int, theta: float, scaling: Mapping[str, Any], dtype: Any = np.float32
) -> np.ndarray:
    """``(head_dim // 2,)`` inverse frequencies, scaled per ``scaling["rope_type"]``: computed in
    float64 and returned as ``dtype`` (float32 for the native model; the HF LLaMA fix keeps
    float64 until its table is built, as transformers does)."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    kind = scaling.get("rope_type", "default")
    if kind == "llama3":
        inv = _llama3(inv, scaling)
    elif kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind != "default":
        raise ValueError(f"rope_type {kind!r} is not supported: accepted default, linear, llama3")
    return inv.astype(dtype)


def _llama3(inv: np.ndarray, s: Mapping[str, Any]) -> np.ndarray:
    """LLaMA-3.1: long wavelengths slowed by ``factor``, a smooth band in between."""
    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_len = float(s.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def apply_rotary(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates ``x: (batch, seq, heads, head_dim)`` by ``positions: (batch, seq)``.

    The half-split convention of HF checkpoints (``rotate_half``); angles in fp32.
    """
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # (b, s, d/2)
    ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]  # (b, s, 1, d)
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    xf = x.astype(jnp.float32)
    return (xf * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)
