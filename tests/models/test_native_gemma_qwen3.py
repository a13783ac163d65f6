"""Gemma 3 (text) and Qwen3 on the native path against PyTorch transformers (whichever version
is installed: 5.x in `make test`).

Each case saves a tiny random PyTorch model (norms, q/k norms and biases randomised so that a
mapping or ``1 + w`` mistake shows) and loads it with the native loader (no torch involved).
The Gemma cases mix sliding and global layers with a window shorter than the sequence, so the
layer pattern, the local rotary base and the window all matter.
"""

import json

import jax
import numpy as np
import pytest
import transformers
from native_tiny import tiny_config
from test_native_parity import ids, torch_logits

from aroma_jax import AromaConfig, AromaTrainer
from aroma_jax.core import sharding
from aroma_jax.data import objectives
from aroma_jax.models import hf
from aroma_jax.models.native import NativeCausalLM, NativeConfig, NativeConfigError, stack_layers
from aroma_jax.models.native.partitioning import param_logical_axes, sharding_rules

torch = pytest.importorskip("torch")

COMMON = tiny_config(vocab_size=96)
GEMMA = dict(
    head_dim=16,  # decoupled: 4 heads x 16 != hidden 32
    query_pre_attn_scalar=24,
    sliding_window=5,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    num_hidden_layers=3,
    rope_theta=1e6,
    rope_local_base_freq=1e4,
)
CASES = {
    "gemma3": ("Gemma3TextConfig", GEMMA),
    "gemma3_final_softcap_linear_rope": (
        "Gemma3TextConfig",
        {
            **GEMMA,
            "final_logit_softcapping": 2.5,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "tie_word_embeddings": False,
        },
    ),
    "qwen3": ("Qwen3Config", dict(head_dim=16, rope_theta=1e6, tie_word_embeddings=False)),
    "qwen3_tied_bias": (
        "Qwen3Config",
        dict(head_dim=8, tie_word_embeddings=True, attention_bias=True, num_key_value_heads=1),
    ),
}
PT_CLASSES = {"Gemma3TextConfig": "Gemma3ForCausalLM", "Qwen3Config": "Qwen3ForCausalLM"}


def hf_config(case):
    cfg_name, kw = CASES[case]
    kw = {**COMMON, **kw}
    if cfg_name == "Gemma3TextConfig" and transformers.__version__ >= "5":
        # 5.x nests the rotary settings per layer type
        full = {"rope_type": "default", "rope_theta": kw.pop("rope_theta")}
        full.update(kw.pop("rope_scaling", None) or {})
        local = {"rope_type": "default", "rope_theta": kw.pop("rope_local_base_freq")}
        kw["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
    return getattr(transformers, cfg_name)(**kw)


def build(case, out, **save_kw):
    cfg = hf_config(case)
    torch.manual_seed(0)
    pt = getattr(transformers, PT_CLASSES[CASES[case][0]])(cfg).eval()
    with torch.no_grad():
        for name, p in pt.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    pt.save_pretrained(out, **save_kw)
    return pt


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_pytorch(case, tmp_path):
    pt = build(case, tmp_path)
    x = ids()
    mask = np.ones_like(x)
    mask[0, :5] = 0  # left padding
    model = NativeCausalLM.from_pretrained(tmp_path)
    for m in (None, mask):
        want = torch_logits(pt, x, m)
        got = np.asarray(model(x.astype(np.int32), attention_mask=m).logits)
        valid = np.ones(x.shape, bool) if m is None else m.astype(bool)
        err = np.abs(got - want)[valid].max()
        print(f"{case} mask={m is not None} (transformers {transformers.__version__}): {err:.2e}")
        assert err < 1e-4
    assert ("lm_head" in model.params) != model.config.tie_word_embeddings
    attn = model.params["model"]["layers"]["1"]["self_attn"]
    assert attn["q_norm"]["weight"].shape == (model.config.head_dim,)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gemma3", "qwen3_tied_bias"])
def test_scanned_remat_matches_pytorch_and_saves_back(case, tmp_path):
    pt = build(case, tmp_path / "src", max_shard_size="20KB")
    x = ids()
    want = torch_logits(pt, x)
    for remat in ("none", "full"):
        model = NativeCausalLM.from_pretrained(tmp_path / "src", scan_layers=True, remat=remat)
        got = np.asarray(model(x.astype(np.int32)).logits)
        np.testing.assert_allclose(got, want, atol=1e-4)
    unrolled = NativeCausalLM.from_pretrained(tmp_path / "src", remat="full")
    np.testing.assert_allclose(np.asarray(unrolled(x.astype(np.int32)).logits), want, atol=1e-4)
    model.save_pretrained(tmp_path / "out")  # per-layer HF names from the stacked tree
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(torch_logits(back, x), want, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gemma3_final_softcap_linear_rope", "qwen3"])
def test_cached_generate_matches_uncached_and_pytorch_greedy(case, tmp_path):
    pt = build(case, tmp_path)
    model = NativeCausalLM.from_pretrained(tmp_path, scan_layers=True)
    prompt = ids(6).astype(np.int32)
    kw = dict(max_new_tokens=6, eos_token_id=-1, pad_token_id=0)
    cached = np.asarray(model.generate(prompt, **kw).sequences)
    plain = np.asarray(model.generate(prompt, use_cache=False, **kw).sequences)
    np.testing.assert_array_equal(cached, plain)
    with torch.no_grad():  # PyTorch's own greedy decoding of the same prompts
        ref = pt.generate(
            torch.tensor(prompt.astype(np.int64)),
            attention_mask=torch.ones(prompt.shape, dtype=torch.long),
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        ).numpy()
    np.testing.assert_array_equal(cached, ref)


def test_scanned_sharding_names_every_layer_leaf():
    cfg = NativeConfig.from_dict({**COMMON, **GEMMA, "model_type": "gemma3_text"})
    model = NativeCausalLM(cfg, scan_layers=True)
    flat = jax.tree_util.tree_flatten_with_path(model.params)[0]
    for path, leaf in flat:
        name = "/".join(str(k.key) for k in path)
        axes = param_logical_axes(name)
        assert axes is not None and len(axes) == leaf.ndim, (name, leaf.shape, axes)


def test_config_defaults_and_refusals():
    cfg = NativeConfig.from_dict({**COMMON, "model_type": "gemma3_text", "num_hidden_layers": 7})
    assert cfg.head_dim == 256 and cfg.tie_word_embeddings and cfg.query_scale == 256**-0.5
    assert [cfg.is_sliding(i) for i in range(7)] == [True] * 5 + [False, True]
    assert cfg.rotary(True) == (1e4, {}) and cfg.rotary(False)[0] == 1e6
    assert NativeConfig.from_dict({**COMMON, "model_type": "qwen3"}).head_dim == 128
    with pytest.raises(NativeConfigError, match="use_sliding_window"):
        NativeConfig.from_dict({**COMMON, "model_type": "qwen3", "use_sliding_window": True})
    with pytest.raises(NativeConfigError, match="multimodal"):
        NativeConfig.from_dict({"model_type": "gemma3", "text_config": {}})
    with pytest.raises(NativeConfigError, match="activation 'relu'"):
        NativeConfig.from_dict({**COMMON, "model_type": "gemma3_text", "hidden_activation": "relu"})
    with pytest.raises(NativeConfigError, match="attn_logit_softcapping"):
        NativeConfig.from_dict({**COMMON, "model_type": "gemma3_text", "attn_logit_softcapping": 5})
    with pytest.raises(NativeConfigError, match="layer_types"):
        NativeConfig.from_dict({**COMMON, "model_type": "gemma3_text", "layer_types": ["x"]})
    saved = json.loads(cfg.raw[0][1])
    assert "head_dim" not in saved  # the file's own keys are written back, not the defaults


def copy_batches(n):
    for i in range(n):
        rng = np.random.default_rng(i % 2)  # two batches in turn: the loss can fall
        x = rng.integers(3, 96, (8, 16)).astype(np.int32)
        x[:, 8:] = x[:, :8]  # a copy task over more than the window: global layers matter
        mask = np.ones_like(x)
        mask[0, :3] = 0
        loss_mask = np.zeros_like(x)
        loss_mask[:, 8:] = 1
        yield {"input_ids": x, "attention_mask": mask, "loss_mask": loss_mask}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma3_text", "qwen3"])
def test_aroma_scanned_remat_sharded_equals_unrolled(family):
    """AROMA on the mixed sliding/global Gemma 3 stack (and Qwen3): unrolled, scanned with
    remat, and scanned on an fsdp x tensor mesh reach the same ranks and losses (one target
    kind and a full reset, so every run draws the same random numbers in the same order)."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    kw = GEMMA if family == "gemma3_text" else CASES["qwen3"][1]
    cfg = NativeConfig.from_dict({**COMMON, **kw, "model_type": family})
    unrolled = NativeCausalLM(cfg, seed=1)
    stacked = stack_layers(unrolled.params, cfg.num_hidden_layers)
    aroma = AromaConfig(
        target_modules=("q_proj",),
        r=1,
        alpha=2.0,
        learning_rate=3e-2,
        max_steps=10,
        inner_max_steps=4,
        inner_check_every=2,
        outer_tol=1e-4,
        warmup_steps=2,
        rewarmup_steps=2,
        reset="full",
    )
    runs = []
    for scan, remat, mesh in ((False, "none", None), (True, "full", None), (True, "none", "x")):
        params = stacked if scan else unrolled.params
        model = NativeCausalLM(cfg, params, remat=remat, scan_layers=scan)
        loss_fn, _ = objectives.causal_lm(model)
        trainer = AromaTrainer(
            loss_fn, model.params, aroma, donate=False, stacked=hf.stacked_of(model) or None
        )
        state = trainer.init(model.params)
        if mesh:
            m = sharding.parse_mesh("fsdp=4,tensor=2", jax.devices()[:8])
            state = sharding.shard_trainer(trainer, state, m, sharding_rules())
        losses, ranks = [], []
        for batch in copy_batches(aroma.max_steps):
            state, info = trainer.step(state, batch)
            losses.append(float(info.loss))
            ranks.append(np.asarray(info.ranks).tolist())
        runs.append((np.asarray(losses), ranks, trainer))
    (u_loss, u_ranks, u_tr), *others = runs
    print(f"{family}: losses {u_loss[0]:.4f} -> {u_loss[-1]:.4f}, final ranks {u_ranks[-1]}")
    assert max(u_ranks[-1]) >= 2 and u_loss[-1] < u_loss[0]
    for loss, ranks, trainer in others:
        assert trainer.paths == u_tr.paths and trainer.compiles == 1
        assert ranks == u_ranks
        np.testing.assert_allclose(loss, u_loss, atol=1e-5, rtol=0)
