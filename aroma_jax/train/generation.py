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

from typing import Any

import jax

from aroma_jax.models.native.seq2seq_search import ban_repeated_ngrams
from aroma_jax.train.run_config import TrainConfig

try:  # transformers 4.x: HF Flax's generate takes a list of these
    from transformers.generation.flax_logits_process import (
        FlaxLogitsProcessor,
        FlaxLogitsProcessorList,
    )
except ImportError:  # transformers 5.x: no Flax generation (native models take the size)
    FlaxLogitsProcessor, FlaxLogitsProcessorList = object, list


class NoRepeatNGram(FlaxLogitsProcessor):
    """Bans any token that would repeat an n-gram already in the sequence (HF semantics)."""

    def __init__(self, ngram_size: int):
        if isinstance(ngram_size, bool) or not isinstance(ngram_size, int) or ngram_size < 1:
            raise ValueError(f"invalid ngram_size={ngram_size!r}: accepted an integer >= 1")
        self.n = ngram_size

    def __call__(self, input_ids: jax.Array, scores: jax.Array, cur_len: Any) -> jax.Array:
        return ban_repeated_ngrams(input_ids, scores, cur_len, self.n)


def search_kwargs(train: TrainConfig, native: bool = False) -> dict[str, Any]:
    """``generate`` keyword arguments from ``train``: length cap, beams, length penalty, minimum
    length and a `NoRepeatNGram` rule when ``no_repeat_ngram_size > 0``. Every one is explicit,
    so the model's own generation defaults (bart-large ships 4 beams) never apply silently.
    ``native``: for `aroma_jax.models.native.seq2seq_model.NativeSeq2SeqLM`, which applies
    ``no_repeat_ngram_size`` itself (and has no forced BOS/EOS unless the checkpoint sets
    them, as on HF Flax)."""
    t = train
    out = {
        "max_length": t.generate_max_len,
        "num_beams": t.num_beams,
        "length_penalty": float(t.length_penalty),
        "min_length": t.generate_min_len,
        "no_repeat_ngram_size": 0,  # ours below, not HF's sparse one
        "early_stopping": True,
    }
    if native:
        out["no_repeat_ngram_size"] = t.no_repeat_ngram_size or 0
    elif t.no_repeat_ngram_size:
        out["logits_processor"] = FlaxLogitsProcessorList([NoRepeatNGram(t.no_repeat_ngram_size)])
    return out
