"""The dense no-repeat n-gram rule against a brute-force reference, and the search keywords."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aroma_jax.train import run_config
from aroma_jax.train.generation import NoRepeatNGram, search_kwargs


def banned_reference(ids: np.ndarray, cur_len: int, n: int) -> set[int]:
    seq = list(ids[:cur_len])
    if cur_len < n - 1:
        return set()
    prefix = seq[cur_len - (n - 1) :] if n > 1 else []
    return {seq[i + n - 1] for i in range(cur_len - n + 1) if seq[i : i + n - 1] == prefix}


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_matches_brute_force(n):
    rng = np.random.default_rng(n)
    ids = rng.integers(0, 5, size=(6, 12))  # a small vocabulary: many repeats
    rule = jax.jit(NoRepeatNGram(n).__call__)
    for cur_len in (0, 1, 3, 7, 12):
        out = np.asarray(rule(jnp.asarray(ids), jnp.zeros((6, 5)), cur_len))
        for row in range(6):
            got = set(np.nonzero(np.isinf(out[row]))[0].tolist())
            assert got == banned_reference(ids[row], cur_len, n), (row, cur_len)


def test_search_kwargs_are_explicit():
    cfg = run_config.resolve({}, ["train.num_beams=6", "train.no_repeat_ngram_size=3"])
    kw = search_kwargs(cfg.train)
    assert kw["num_beams"] == 6 and kw["no_repeat_ngram_size"] == 0
    assert isinstance(kw["logits_processor"][0], NoRepeatNGram)
    assert "logits_processor" not in search_kwargs(run_config.resolve({}).train)
    with pytest.raises(ValueError, match="num_beams"):
        run_config.resolve({}, ["train.num_beams=0"])
    with pytest.raises(ValueError, match="dev_examples"):
        run_config.resolve({}, ["task.dev_examples=-1"])
