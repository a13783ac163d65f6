"""The fixed Flax LLaMA against PyTorch transformers on tiny random configs (transformers 4.x:
`make test-hf4`)."""

import numpy as np
import pytest
import transformers

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.hf4


def fixed_class():
    """Imported per test: the module subclasses HF Flax classes that transformers 5 lacks."""
    from aroma_jax.models.llama import FixedFlaxLlamaForCausalLM

    return FixedFlaxLlamaForCausalLM

CASES = {
    "theta1e5_tied": dict(rope_theta=1e5, tie_word_embeddings=True),
    "theta5e5_llama3_untied": dict(
        rope_theta=5e5,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
}


def build(case, tmp_path):
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        max_position_embeddings=48,
        **CASES[case],
    )
    torch.manual_seed(0)
    pt = transformers.LlamaForCausalLM(cfg).eval()
    pt.save_pretrained(tmp_path / case)
    return pt


def ids():
    return np.random.default_rng(0).integers(0, 128, (2, 40)).astype(np.int64)


@pytest.mark.parametrize("case", list(CASES))
def test_fixed_llama_matches_pytorch(case, tmp_path):
    pt = build(case, tmp_path)
    x = ids()
    with torch.no_grad():
        want = pt(torch.tensor(x)).logits.numpy()
    fx = fixed_class().from_pretrained(tmp_path / case, from_pt=True)
    got = np.asarray(fx(x.astype(np.int32)).logits)
    print(f"{case}: max |flax - torch| = {np.abs(got - want).max():.2e}")
    assert np.abs(got - want).max() < 1e-4
    assert ("lm_head" in fx.params) != fx.config.tie_word_embeddings
    out = fx.generate(x[:1, :5].astype(np.int32), max_length=9, do_sample=False)
    assert out.sequences.shape == (1, 9)


def test_unfixed_hf_flax_llama_differs_and_stays_unmodified(tmp_path):
    from aroma_jax.models.llama import rotary_table

    pt = build("theta1e5_tied", tmp_path)
    x = ids()
    with torch.no_grad():
        want = pt(torch.tensor(x)).logits.numpy()
    cfg = transformers.LlamaConfig.from_pretrained(tmp_path / "theta1e5_tied")
    from transformers.models.llama import modeling_flax_llama as hf

    table = hf.create_sinusoidal_positions(cfg.max_position_embeddings, 16)
    ours = np.asarray(rotary_table(cfg, 48))
    assert np.abs(table - ours).max() > 1e-3  # rope_theta ignored by HF
    flax_plain = transformers.FlaxLlamaForCausalLM.from_pretrained(
        tmp_path / "theta1e5_tied", from_pt=True
    )
    before = np.asarray(flax_plain(x.astype(np.int32)).logits)
    print(f"unfixed HF Flax LLaMA: max |flax - torch| = {np.abs(before - want).max():.2e}")
    assert np.abs(before - want).max() > 1e-3  # untied head and the wrong rotary base
    # Using the fixed class leaves HF's own class exactly as shipped (the fix is scoped).
    fixed = fixed_class().from_pretrained(tmp_path / "theta1e5_tied", from_pt=True)
    np.testing.assert_allclose(np.asarray(fixed(x.astype(np.int32)).logits), want, atol=1e-4)
    after = np.asarray(flax_plain(x.astype(np.int32)).logits)
    np.testing.assert_array_equal(after, before)


def test_fixed_llama_builds_when_two_head_dims_exceed_max_positions(tmp_path):
    """HF slices its rotary table by max_position_embeddings along the feature axis, so a config
    with 2 * head_dim > max_position_embeddings fails already in the constructor's init."""
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,  # head_dim 16: the table needs 32 features, HF keeps 20
        num_key_value_heads=2,
        intermediate_size=96,
        max_position_embeddings=20,
    )
    with pytest.raises(TypeError, match="incompatible shapes"):
        transformers.FlaxLlamaForCausalLM(cfg, seed=0)
    x = ids()[:, :20]
    random_init = fixed_class()(cfg, seed=0)
    assert random_init(x.astype(np.int32)).logits.shape == (2, 20, 128)
    torch.manual_seed(0)
    pt = transformers.LlamaForCausalLM(cfg).eval()
    pt.save_pretrained(tmp_path / "short")
    with torch.no_grad():
        want = pt(torch.tensor(x)).logits.numpy()
    fx = fixed_class().from_pretrained(tmp_path / "short", from_pt=True)
    np.testing.assert_allclose(np.asarray(fx(x.astype(np.int32)).logits), want, atol=1e-4)
