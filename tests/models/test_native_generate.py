"""Greedy generation with the KV cache against re-running the whole buffer per token.

No torch and no transformers model class: tiny random native models of each variant (GQA,
Mistral's sliding window, Qwen2's q/k/v biases with a tied head), unrolled and scanned, with
left-padded prompts; and a scanned model carrying layer-stacked AROMA adapters.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from native_tiny import prompts, tiny_config

from aroma_jax import AromaConfig, AromaTrainer
from aroma_jax.data import objectives
from aroma_jax.models.native import NativeCausalLM, NativeConfig
from aroma_jax.models.native.modeling import init_cache, stack_layers

VARIANTS = {
    "llama_gqa": dict(model_type="llama"),
    "mistral_window": dict(model_type="mistral", sliding_window=3),
    "qwen2_bias_tied": dict(model_type="qwen2", tie_word_embeddings=True, num_key_value_heads=1),
}


def model(variant: str, scan: bool) -> NativeCausalLM:
    cfg = NativeConfig.from_dict(tiny_config(**VARIANTS[variant]))
    ref = NativeCausalLM(cfg, seed=1)
    params = jax.tree.map(lambda x: x * 4.0, ref.params)  # peaked logits: no argmax near-ties
    if not scan:
        return NativeCausalLM(cfg, params)
    return NativeCausalLM(cfg, stack_layers(params, cfg.num_hidden_layers), scan_layers=True)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_generate_equals_rerunning_the_buffer(variant, scan):
    m = model(variant, scan)
    ids, mask = prompts()
    kw = dict(attention_mask=mask, max_new_tokens=6, eos_token_id=-1, pad_token_id=0)
    cached = np.asarray(m.generate(ids, **kw).sequences)
    full = np.asarray(m.generate(ids, use_cache=False, **kw).sequences)
    np.testing.assert_array_equal(cached, full)
    assert len(set(cached[:, 7:].ravel().tolist())) > 1  # not a degenerate constant output


def test_cached_generate_pads_after_the_end_of_sequence_token():
    m = model("llama_gqa", scan=True)
    ids, mask = prompts()
    kw = dict(attention_mask=mask, max_new_tokens=6, pad_token_id=0)
    eos = int(np.asarray(m.generate(ids, eos_token_id=-1, **kw).sequences)[0, 8])
    cached = np.asarray(m.generate(ids, eos_token_id=eos, **kw).sequences)
    full = np.asarray(m.generate(ids, eos_token_id=eos, use_cache=False, **kw).sequences)
    np.testing.assert_array_equal(cached, full)
    assert cached[0, 8] == eos and (cached[0, 9:] == 0).all()


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_cached_logits_equal_the_full_forward_pass(scan):
    m = model("mistral_window", scan)
    ids, mask = prompts()
    mask = jnp.asarray(mask)
    pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    apply = jax.jit(lambda *a: m.module.apply({"params": m.params}, *a))
    full = apply(ids, mask, pos)  # (3, 7, vocab)
    # Prefill 4 tokens, then one token at a time into a 9-slot buffer.
    cache = init_cache(m.config, 3, 9)
    buf_mask = jnp.concatenate([mask, jnp.zeros((3, 2), mask.dtype)], axis=1)
    logits, cache = apply(ids[:, :4], buf_mask, pos[:, :4], cache, 0)
    steps = [logits]
    for i in range(4, 7):
        logits, cache = apply(ids[:, i : i + 1], buf_mask, pos[:, i : i + 1], cache, i)
        steps.append(logits)
    got = jnp.concatenate(steps, axis=1)
    valid = np.asarray(mask, bool)  # padded query rows attend to nothing: not compared
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(full)[valid], atol=2e-5)
    assert cache.keys.shape == (2, 3, 9, 2, 8)


def test_cached_generate_applies_layer_stacked_adapters():
    m = model("llama_gqa", scan=True)
    loss_fn, _ = objectives.causal_lm(m)
    cfg = AromaConfig(target_modules=("q_proj", "v_proj", "down_proj"), max_steps=4)
    trainer = AromaTrainer(loss_fn, m.params, cfg, stacked={"model/layers": 2}, donate=False)
    state = trainer.init(m.params)
    keys = iter(jax.random.split(jax.random.key(3), 8))
    pairs = {  # a nonzero update in every layer
        p: pair._replace(b=jax.random.normal(next(keys), pair.b.shape))
        for p, pair in state.adapters.pairs.items()
    }
    state = state._replace(adapters=state.adapters._replace(pairs=pairs))
    ids, mask = prompts()
    kw = dict(attention_mask=mask, max_new_tokens=5, eos_token_id=-1, pad_token_id=0)
    with trainer.applied(state) as params:
        cached = np.asarray(m.generate(ids, params=params, **kw).sequences)
        full = np.asarray(m.generate(ids, params=params, use_cache=False, **kw).sequences)
    np.testing.assert_array_equal(cached, full)
    base = np.asarray(m.generate(ids, **kw).sequences)
    assert (cached != base).any()  # the adapters changed what is generated
