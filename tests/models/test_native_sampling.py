"""Sampling in native `generate`: HF's temperature, top-k and top-p filters, and the draws.

No torch and no transformers model class; the filters are checked on hand-made logits, the
draws' frequencies against the filtered distribution, and `generate` on tiny random models.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from native_tiny import prompts, tiny_config

from aroma_jax.models.native import NativeCausalLM, NativeConfig
from aroma_jax.models.native.modeling import stack_layers
from aroma_jax.models.native.sampling import (
    Sampling,
    as_key,
    choose,
    filter_logits,
    from_generate_kwargs,
)

PROBS = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS = jnp.log(jnp.asarray(PROBS, jnp.float32))[None]


def kept(s: Sampling) -> list[bool]:
    return np.isfinite(np.asarray(filter_logits(LOGITS, s)[0])).tolist()


def test_top_p_keeps_the_smallest_set_reaching_p():
    # cumulative probability before each token: 0, 0.5, 0.8, 0.95
    assert kept(Sampling(top_k=0, top_p=0.7)) == [True, True, False, False]
    assert kept(Sampling(top_k=0, top_p=0.8)) == [True, True, False, False]  # 0.8 reached
    assert kept(Sampling(top_k=0, top_p=0.81)) == [True, True, True, False]
    assert kept(Sampling(top_k=0, top_p=0.01)) == [True, False, False, False]  # never empty
    assert kept(Sampling(top_k=0, top_p=1.0)) == [True] * 4
    # the ranking is by logit, not by position
    shuffled = LOGITS[:, ::-1]
    got = np.isfinite(np.asarray(filter_logits(shuffled, Sampling(top_k=0, top_p=0.7))[0]))
    assert got.tolist() == [False, False, True, True]


def test_top_k_keeps_exactly_k_and_temperature_divides():
    assert kept(Sampling(top_k=2, top_p=1.0)) == [True, True, False, False]
    assert kept(Sampling(top_k=3, top_p=0.7)) == [True, True, False, False]  # both apply
    ties = jnp.zeros((1, 5))
    assert int(jnp.sum(jnp.isfinite(filter_logits(ties, Sampling(top_k=2))))) == 2
    hot = filter_logits(LOGITS, Sampling(temperature=2.0, top_k=0))
    np.testing.assert_allclose(np.asarray(hot), np.asarray(LOGITS) / 2.0, rtol=1e-6)
    # temperature applies before top-p: flatter probabilities need more tokens to reach p
    assert kept(Sampling(temperature=4.0, top_k=0, top_p=0.7)) == [True, True, True, False]


def test_draws_follow_the_filtered_distribution():
    s = Sampling(top_k=0, top_p=0.81)  # keeps tokens 0, 1, 2
    n = 20000
    draws = jax.vmap(lambda k: choose(LOGITS[0], s, k))(jax.random.split(jax.random.key(3), n))
    freq = np.bincount(np.asarray(draws), minlength=4) / n
    want = np.append(PROBS[:3] / PROBS[:3].sum(), 0.0)
    assert freq[3] == 0
    np.testing.assert_allclose(freq, want, atol=0.015)
    assert int(choose(LOGITS, None, None)[0]) == 0  # greedy: the argmax


def test_settings_are_checked_and_hf_defaults_apply():
    assert from_generate_kwargs(do_sample=False, top_k=3) is None
    assert from_generate_kwargs(do_sample=True) == Sampling(1.0, 50, 1.0)
    assert from_generate_kwargs(do_sample=True, top_p=0.9, top_k=None) == Sampling(top_p=0.9)
    with pytest.raises(ValueError, match="num_beams=4: .* accepted num_beams=1"):
        from_generate_kwargs(num_beams=4)
    with pytest.raises(ValueError, match=r"temperature=0.0: accepted a number > 0"):
        Sampling(temperature=0.0)
    with pytest.raises(ValueError, match=r"top_p=1.5: accepted a number in \(0, 1\]"):
        Sampling(top_p=1.5)
    with pytest.raises(ValueError, match="top_k=-1: accepted an integer >= 0"):
        Sampling(top_k=-1)
    with pytest.raises(ValueError, match="top_k=2.5: accepted an integer"):
        Sampling(top_k=2.5)
    with pytest.raises(ValueError, match="temperature=nan"):
        Sampling(temperature=float("nan"))
    # numpy scalars are stored as Python numbers: one jit-cache entry per setting
    s = Sampling(temperature=np.float32(0.5), top_k=np.int64(3), top_p=np.float64(0.9))
    assert s == Sampling(0.5, 3, 0.9) and hash(s) == hash(Sampling(0.5, 3, 0.9))
    assert type(s.temperature) is float and type(s.top_k) is int
    raw = jax.random.PRNGKey(5)
    assert jnp.array_equal(jax.random.key_data(as_key(raw)), raw)
    assert jnp.array_equal(jax.random.key_data(as_key(5)), raw)
    with pytest.raises(ValueError, match="accepted a jax PRNG key"):
        as_key(np.zeros((3,), np.float32))


def tiny(scan: bool) -> NativeCausalLM:
    cfg = NativeConfig.from_dict(tiny_config(model_type="llama"))
    params = NativeCausalLM(cfg, seed=1).params
    if not scan:
        return NativeCausalLM(cfg, params)
    return NativeCausalLM(cfg, stack_layers(params, cfg.num_hidden_layers), scan_layers=True)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_sampled_generate_is_reproducible_and_the_same_with_and_without_the_cache(scan):
    m = tiny(scan)
    ids, mask = prompts()
    kw = dict(max_new_tokens=8, eos_token_id=-1, do_sample=True, top_k=0, temperature=1.5)
    a = m.generate(ids, mask, prng_key=jax.random.PRNGKey(0), **kw).sequences
    b = m.generate(ids, mask, prng_key=jax.random.key(0), use_cache=False, **kw).sequences
    c = m.generate(ids, mask, **kw).sequences  # HF Flax's default key, PRNGKey(0)
    other = m.generate(ids, mask, prng_key=1, **kw).sequences
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(a[:, :7], ids)
    assert not np.array_equal(a, other)  # another key, other tokens
    greedy = m.generate(ids, mask, max_new_tokens=8, eos_token_id=-1).sequences
    assert not np.array_equal(a, greedy)


def test_sampling_with_top_k_one_is_greedy():
    m = tiny(False)
    ids, mask = prompts()
    greedy = m.generate(ids, mask, max_new_tokens=6, eos_token_id=-1).sequences
    one = m.generate(
        ids, mask, max_new_tokens=6, eos_token_id=-1, do_sample=True, top_k=1, prng_key=9
    ).sequences
    np.testing.assert_array_equal(one, greedy)
    with pytest.raises(ValueError, match="num_beams=2"):
        m.generate(ids, mask, max_new_tokens=2, num_beams=2)
