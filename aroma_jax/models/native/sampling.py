"""How native `generate` picks each token: greedy, or sampling with temperature, top-k and top-p.

The filters are HF's logits warpers, in HF's order: divide by ``temperature``, keep the
``top_k`` largest logits, then keep the smallest set of tokens whose probability sums to at
least ``top_p`` (the most likely token always stays). Removed tokens get ``-inf``. Defaults
are HF ``GenerationConfig``'s (temperature 1, top-k 50, top-p 1); a checkpoint's own
``generation_config.json`` is not read.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from aroma_jax.models.native.sampling import Sampling, filter_logits
    >>> logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    >>> bool(jnp.all(jnp.isfinite(filter_logits(logits, Sampling(top_k=0, top_p=0.7))[0, :2])))
    True
    >>> jnp.isneginf(filter_logits(logits, Sampling(top_k=0, top_p=0.7))).tolist()
    [[False, False, True, True]]
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sampling settings (hashable: one compiled generate loop per settings)."""

    temperature: float = 1.0
    top_k: int = 50  # 0: no top-k filter
    top_p: float = 1.0  # 1: no top-p filter

    def __post_init__(self):
        # numpy scalars are accepted and stored as Python numbers: the settings key the jit
        # cache, where 0.7 and float32(0.7) must not make two programs.
        t, k, p = self.temperature, self.top_k, self.top_p
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not t > 0:
            raise ValueError(
                f"temperature={t!r}: accepted a number > 0 (for greedy decoding pass "
                "do_sample=False)"
            )
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise ValueError(f"top_k={k!r}: accepted an integer >= 0 (0: no top-k)")
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1:
            raise ValueError(f"top_p={p!r}: accepted a number in (0, 1] (1: no top-p)")
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_k", int(k))
        object.__setattr__(self, "top_p", float(p))


def from_generate_kwargs(
    do_sample: bool = False,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    num_beams: int | None = None,
) -> Sampling | None:
    """The `Sampling` that HF-style ``generate`` keywords ask for, or None for greedy.

    ``do_sample`` switches sampling on; ``temperature``, ``top_k`` and ``top_p`` default to HF's
    values when None. Beam search (``num_beams > 1``) is rejected.
    """
    if num_beams not in (None, 1):
        raise ValueError(
            f"num_beams={num_beams!r}: native generate has no beam search; accepted "
            "num_beams=1 (greedy, or sampling with do_sample=True)"
        )
    if not do_sample:
        return None
    given = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    return Sampling(**{k: v for k, v in given.items() if v is not None})


def filter_logits(logits: Array, s: Sampling) -> Array:
    """``logits (..., vocab)`` scaled by the temperature, with the tokens that top-k and top-p
    remove set to ``-inf`` (exactly ``top_k`` kept, ties broken by index as `lax.top_k`)."""
    x = logits.astype(jnp.float32) / s.temperature
    vocab = x.shape[-1]
    neg = jnp.full_like(x, -jnp.inf)
    if 0 < s.top_k < vocab:
        vals, idx = jax.lax.top_k(x, s.top_k)
        x = jnp.put_along_axis(neg, idx, vals, axis=-1, inplace=False)
    if s.top_p < 1:
        order = jnp.argsort(-x, axis=-1, stable=True)  # most likely first
        ranked = jnp.take_along_axis(x, order, axis=-1)
        probs = jax.nn.softmax(ranked, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above
        keep_ranked = before < s.top_p  # the first token always (before = 0)
        keep = jnp.put_along_axis(
            jnp.zeros(x.shape, bool), order, keep_ranked, axis=-1, inplace=False
        )
        x = jnp.where(keep, x, neg)
    return x


def choose(logits: Array, s: Sampling | None, key: Array | None) -> Array:
    """The next token of every row: ``argmax`` (greedy), or a draw from the filtered logits."""
    if s is None:
        return jnp.argmax(logits, axis=-1)
    return jax.random.categorical(key, filter_logits(logits, s), axis=-1)


def as_key(prng_key: Any) -> Array:
    """A typed PRNG key from HF's ``prng_key`` (a raw ``uint32[2]`` key, a typed key, an int
    seed, or None for HF Flax's default ``PRNGKey(0)``)."""
    if prng_key is None:
        return jax.random.key(0)
    if isinstance(prng_key, int) and not isinstance(prng_key, bool):
        return jax.random.key(prng_key)
    key = jnp.asarray(prng_key) if not isinstance(prng_key, jax.Array) else prng_key
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if key.dtype == jnp.uint32 and key.shape == (2,):
        return jax.random.wrap_key_data(key)
    raise ValueError(
        f"prng_key of dtype {key.dtype} and shape {tuple(key.shape)}: accepted a jax PRNG key "
        "(jax.random.key or PRNGKey), an int seed, or None"
    )
