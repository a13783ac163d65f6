"""Generation settings for evaluation: HF ``generate`` keywords from a run config, and a dense
no-repeat n-gram rule.

``transformers``' own ``FlaxNoRepeatNGramLogitsProcessor`` builds its n-gram table with
``jax.experimental.sparse`` and fails under current JAX (``bcoo_gather: mode=CLIP not yet
supported``), so `NoRepeatNGram` does the same job with dense comparisons: for every position
``i`` whose ``n - 1`` tokens equal the last ``n - 1`` generated ones, the token at ``i + n - 1``
is banned. It is O(n x length) per row and jits inside beam search.

Example:
    >>> import jax.numpy as jnp
    >>> ids = jnp.array([[5, 6, 7, 5, 6, 0, 0]])  # cur_len 5: "5 6" was followed by 7 before
    >>> out = NoRepeatNGram(3)(ids, jnp.zeros((1, 9)), 5)
    >>> [int(t) for t in jnp.nonzero(jnp.isinf(out[0]))[0]]
    [7]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from transformers.generation.flax_logits_process import (
    FlaxLogitsProcessor,
    FlaxLogitsProcessorList,
)


class NoRepeatNGram(FlaxLogitsProcessor):
    """Bans any token that would repeat an n-gram already in the sequence (HF semantics)."""

    def __init__(self, ngram_size: int):
        if isinstance(ngram_size, bool) or not isinstance(ngram_size, int) or ngram_size < 1:
            raise ValueError(f"invalid ngram_size={ngram_size!r}: accepted an integer >= 1")
        self.n = ngram_size

    def __call__(self, input_ids: jax.Array, scores: jax.Array, cur_len: Any) -> jax.Array:
        n = self.n
        rows, length = input_ids.shape
        pos = jnp.arange(length)
        # an n-gram starting at i is complete (all n tokens generated) when i + n - 1 < cur_len
        match = jnp.broadcast_to(pos + n - 1 < cur_len, (rows, length))
        start = cur_len - (n - 1)  # first of the last n - 1 tokens
        for k in range(n - 1):
            earlier = jnp.take(input_ids, jnp.clip(pos + k, 0, length - 1), axis=1)
            latest = jnp.take(input_ids, jnp.clip(start + k, 0, length - 1), axis=1)
            match = match & (earlier == latest[:, None])
        match = match & (start >= 0)
        banned_tok = jnp.take(input_ids, jnp.clip(pos + n - 1, 0, length - 1), axis=1)
        banned = jnp.zeros(scores.shape, bool).at[jnp.arange(rows)[:, None], banned_tok].max(match)
        return jnp.where(banned, -jnp.inf, scores)


def search_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``generate`` keyword arguments from ``train``: length cap, beams, length penalty, minimum
    length and a `NoRepeatNGram` rule when ``no_repeat_ngram_size > 0``. Every one is explicit,
    so the model's own generation defaults (bart-large ships 4 beams) never apply silently."""
    t = cfg["train"]
    out = {
        "max_length": t["generate_max_len"],
        "num_beams": t["num_beams"],
        "length_penalty": float(t["length_penalty"]),
        "min_length": t["generate_min_len"],
        "no_repeat_ngram_size": 0,  # ours below, not HF's sparse one
        "early_stopping": True,
    }
    if t["no_repeat_ngram_size"]:
        out["logits_processor"] = FlaxLogitsProcessorList(
            [NoRepeatNGram(t["no_repeat_ngram_size"])]
        )
    return out
