"""The native LLaMA-family models against PyTorch transformers (whichever version is installed).

Every case saves a tiny random PyTorch model with ``save_pretrained`` (safetensors), loads it
with the native loader (no torch involved) and compares fp32 logits.
"""

import json

import numpy as np
import pytest
import transformers
from native_tiny import tiny_config

from aroma_jax.models.native import NativeCausalLM, NativeConfig, NativeConfigError, checkpoint_io

torch = pytest.importorskip("torch")

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
COMMON = tiny_config(vocab_size=96)
CASES = {
    "llama2": ("LlamaConfig", dict(num_key_value_heads=4)),
    "llama3": ("LlamaConfig", dict(rope_theta=5e5)),
    "llama3.1": ("LlamaConfig", dict(rope_theta=5e5, rope_scaling=LLAMA3_ROPE)),
    "llama3.2_tied_head_dim": (
        "LlamaConfig",
        dict(rope_theta=5e5, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True, head_dim=16),
    ),
    "llama_biases": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True)),
    "mistral_window": ("MistralConfig", dict(sliding_window=6, rope_theta=1e6)),
    "qwen2_tied": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen2.5_untied": ("Qwen2Config", dict(tie_word_embeddings=False, num_key_value_heads=1)),
}
PT_CLASSES = {
    "LlamaConfig": "LlamaForCausalLM",
    "MistralConfig": "MistralForCausalLM",
    "Qwen2Config": "Qwen2ForCausalLM",
}


def build(case, out, dtype=None, **save_kw):
    cfg_name, kw = CASES[case]
    cfg = getattr(transformers, cfg_name)(**{**COMMON, **kw})
    torch.manual_seed(0)
    pt = getattr(transformers, PT_CLASSES[cfg_name])(cfg).eval()
    with torch.no_grad():  # random biases/norms so that a mapping mistake cannot hide
        for name, p in pt.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    if dtype is not None:
        pt = pt.to(dtype)
    pt.save_pretrained(out, **save_kw)
    return pt


def ids(seq=20):
    return np.random.default_rng(0).integers(0, 96, (2, seq)).astype(np.int64)


def torch_logits(pt, x, mask=None):
    kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
    with torch.no_grad():
        return pt.float()(torch.tensor(x), **kw).logits.numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_native_logits_match_pytorch(case, tmp_path):
    pt = build(case, tmp_path)
    x = ids()
    want = torch_logits(pt, x)
    model = NativeCausalLM.from_pretrained(tmp_path)
    got = np.asarray(model(x.astype(np.int32)).logits)
    err = np.abs(got - want).max()
    print(f"{case} (transformers {transformers.__version__}): max |native - torch| = {err:.2e}")
    assert err < 1e-4
    assert ("lm_head" in model.params) != model.config.tie_word_embeddings
    assert "kernel" in model.params["model"]["layers"]["1"]["self_attn"]["q_proj"]


@pytest.mark.parametrize("case", ["llama3", "qwen2_tied", "mistral_window"])
def test_native_padding_mask_matches_pytorch(case, tmp_path):
    pt = build(case, tmp_path)
    x = ids()
    mask = np.ones_like(x)
    mask[0, :5] = 0  # left padding
    mask[1, -4:] = 0  # right padding
    want = torch_logits(pt, x, mask)
    model = NativeCausalLM.from_pretrained(tmp_path)
    got = np.asarray(model(x.astype(np.int32), attention_mask=mask).logits)
    valid = mask.astype(bool)
    err = np.abs(got - want)[valid].max()
    print(f"{case} padded: max |native - torch| = {err:.2e}")
    assert err < 1e-4
    # The mask matters: without it the first row's valid positions read the padding.
    unmasked = np.asarray(model(x.astype(np.int32)).logits)
    assert np.abs(unmasked - want)[0][valid[0]].max() > 1e-3


def test_sharded_bf16_checkpoint_loads_lazily_with_casting(tmp_path):
    pt = build("llama3.1", tmp_path, dtype=torch.bfloat16, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    x = ids()
    want = torch_logits(pt, x)  # the bf16 weights, computed in fp32
    model = NativeCausalLM.from_pretrained(tmp_path)  # cast to fp32 leaf by leaf
    assert model.params["model"]["norm"]["weight"].dtype == np.float32
    np.testing.assert_allclose(np.asarray(model(x.astype(np.int32)).logits), want, atol=1e-4)
    seen = []
    bf16 = NativeCausalLM.from_pretrained(
        tmp_path, param_dtype="bfloat16", sharding_for=lambda p, s: seen.append(p)
    )
    assert bf16.params["lm_head"]["kernel"].dtype.name == "bfloat16"
    assert "model/layers/0/self_attn/q_proj/kernel" in seen and len(seen) == 2 * 9 + 3


def test_save_pretrained_loads_in_pytorch(tmp_path):
    build("qwen2_tied", tmp_path / "src")
    model = NativeCausalLM.from_pretrained(tmp_path / "src")
    model.save_pretrained(tmp_path / "out")
    pt = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = ids()
    np.testing.assert_allclose(
        np.asarray(model(x.astype(np.int32)).logits), torch_logits(pt, x), atol=1e-4
    )


@pytest.mark.parametrize("case", ["llama3.2_tied_head_dim", "qwen2.5_untied"])
def test_scanned_load_matches_pytorch_and_saves_back(case, tmp_path):
    pt = build(case, tmp_path / "src", dtype=torch.bfloat16, max_shard_size="20KB")
    x = ids()
    want = torch_logits(pt, x)
    model = NativeCausalLM.from_pretrained(tmp_path / "src", scan_layers=True)  # sharded, bf16
    q = model.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.shape[0] == 2 and q.dtype == np.float32
    np.testing.assert_allclose(np.asarray(model(x.astype(np.int32)).logits), want, atol=1e-4)
    model.save_pretrained(tmp_path / "out")  # per-layer HF names from the stacked tree
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(torch_logits(back, x), want, atol=1e-4)


def test_rejects_unsupported_configs(tmp_path):
    base = {**COMMON, "model_type": "llama"}
    with pytest.raises(NativeConfigError, match="accepted"):
        NativeConfig.from_dict({**base, "model_type": "gpt2"})
    with pytest.raises(NativeConfigError, match="rope type 'yarn'"):
        NativeConfig.from_dict({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(NativeConfigError, match="multiple"):
        NativeConfig.from_dict({**base, "num_key_value_heads": 3})
    with pytest.raises(FileNotFoundError, match="safetensors"):
        checkpoint_io.checkpoint_files(tmp_path)


def test_transformers_5_rope_parameters_are_read():
    cfg = NativeConfig.from_dict(
        {
            **COMMON,
            "model_type": "llama",
            "rope_parameters": {"rope_theta": 5e5, **LLAMA3_ROPE},
        }
    )
    assert cfg.rope_theta == 5e5 and cfg.rope["rope_type"] == "llama3"
    assert cfg.rope["factor"] == 8.0


def test_greedy_generate_matches_stepwise_argmax(tmp_path):
    build("llama3", tmp_path)
    model = NativeCausalLM.from_pretrained(tmp_path)
    prompt = ids(6).astype(np.int32)
    mask = np.ones_like(prompt)
    mask[1, :2] = 0
    out = np.asarray(
        model.generate(prompt, attention_mask=mask, max_new_tokens=4, eos_token_id=-1).sequences
    )
    assert out.shape == (2, 10)
    for row in range(2):  # reference: the unpadded prompt and the continuation, run once
        seq = np.concatenate([prompt[row][mask[row].astype(bool)], out[row, 6:]])
        logits = np.asarray(model(seq[None].astype(np.int32)).logits)
        # Causal: position i's logits are those of a forward pass over seq[: i + 1] alone, so
        # each generated token must be the argmax after the prompt and the tokens before it
        # (the stepwise argmax, without a separately compiled forward pass per length).
        np.testing.assert_array_equal(out[row, 6:], np.argmax(logits[0, -5:-1], axis=-1))
