"""AROMA end to end on an NNX model someone else wrote: tunix's LLaMA 3 (``google-tunix``,
requirements-nnx.txt), a tiny random config, against our native linen LLaMA with the same
weights: same base logits, same losses and ranks, same PEFT export.

tunix's top-level package imports its whole trainer stack (and pins ``safetensors<0.8``, which
conflicts with ours), so it is installed with ``--no-deps`` and only its model modules, which
need jax, flax and jaxtyping, are imported here (`tunix_llama3`).
"""

import contextlib
import importlib
import importlib.util
import re
import sys
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aroma_jax import AromaConfig, AromaTrainer, NnxTrainer
from aroma_jax.data import objectives
from aroma_jax.models.native import NativeCausalLM, NativeConfig
from aroma_jax.train import artifacts, export
from tests.models.native_tiny import tiny_config

TINY = tiny_config(
    model_type="llama",
    tie_word_embeddings=False,
    rms_norm_eps=1e-6,
    rope_theta=1e6,  # tunix's LLaMA 3 applies RoPE with its default theta, 1e6
)


def tunix_llama3():
    """``tunix.models.llama3.model`` without running ``tunix/__init__.py`` (its trainers)."""
    if "tunix.models.llama3.model" not in sys.modules:
        spec = importlib.util.find_spec("tunix")
        if spec is None:
            raise ImportError(
                "google-tunix is missing: pip install --no-deps -r requirements-nnx.txt"
            )
        pkg = types.ModuleType("tunix")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules.setdefault("tunix", pkg)
        # Importing it turns a global flax flag off (`unsharded`); keep the process's value.
        with unsharded():
            importlib.import_module("tunix.models.llama3.model")
    return sys.modules["tunix.models.llama3.model"]


@contextlib.contextmanager
def unsharded():
    """tunix annotates its params with mesh axes and builds its models with flax's
    ``flax_always_shard_variable`` off (no mesh needed); other tests keep the default."""
    before = flax.config.flax_always_shard_variable
    flax.config.update("flax_always_shard_variable", False)
    try:
        yield
    finally:
        flax.config.update("flax_always_shard_variable", before)


def tunix_model(layers: int = TINY["num_hidden_layers"], abstract: bool = False):
    """tunix's ``Llama3`` in the `TINY` config; ``abstract``: shapes only (``nnx.eval_shape``),
    which skips its eager initialisers (most of a fast test's time)."""
    lib = tunix_llama3()
    c = TINY
    config = lib.ModelConfig(
        num_layers=layers,
        vocab_size=c["vocab_size"],
        embed_dim=c["hidden_size"],
        hidden_dim=c["intermediate_size"],
        num_heads=c["num_attention_heads"],
        head_dim=c["hidden_size"] // c["num_attention_heads"],
        num_kv_heads=c["num_key_value_heads"],
        rope_theta=int(c["rope_theta"]),
        norm_eps=c["rms_norm_eps"],
    )
    build = lambda: lib.Llama3(config, rngs=nnx.Rngs(0))  # noqa: E731
    with unsharded():
        return nnx.eval_shape(build) if abstract else build()


# tunix LLaMA 3 param path -> HF (our native model's) param path: the weight mapping.
HF_NAMES = (
    (r"embedder/input_embedding", "model/embed_tokens/embedding"),
    (r"layers/(\d+)/attn/(\w+)/kernel", r"model/layers/\1/self_attn/\2/kernel"),
    (r"layers/(\d+)/mlp/(\w+)/kernel", r"model/layers/\1/mlp/\2/kernel"),
    (r"layers/(\d+)/(\w+_layernorm)/w", r"model/layers/\1/\2/weight"),
    (r"final_norm/w", "model/norm/weight"),
    (r"lm_head/kernel", "lm_head/kernel"),
)


def hf_name(path: str) -> str:
    for pattern, name in HF_NAMES:
        if re.fullmatch(pattern, path):
            return re.sub(pattern, name, path)
    raise KeyError(f"no HF name for tunix param {path!r}")


class _Logits:
    """tunix's ``Llama3`` behind the HF calling convention `objectives.causal_lm` uses."""

    def __init__(self, module):
        self.module = module

    def __call__(self, input_ids, attention_mask, params=None, **unused):
        b, t = input_ids.shape
        causal = jnp.tril(jnp.ones((t, t), bool))[None] & attention_mask[:, None, :].astype(bool)
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        return types.SimpleNamespace(logits=self.module(input_ids, positions, None, causal)[0])


def nnx_loss(module, batch, rng):
    return objectives.causal_lm(_Logits(module))[0](None, batch, rng)


def batches(n):
    for i in range(n):
        rng = np.random.default_rng(i % 3)
        x = rng.integers(3, 64, (4, 12)).astype(np.int32)
        x[:, 6:] = x[:, :6]
        loss_mask = np.zeros_like(x)
        loss_mask[:, 6:] = 1
        yield {"input_ids": x, "attention_mask": np.ones_like(x), "loss_mask": loss_mask}


def cfg(**kw):
    base = dict(
        target_modules=("q_proj", "v_proj", "o_proj", "down_proj"),
        r=1,
        alpha=2.0,
        learning_rate=3e-2,
        max_steps=16,
        inner_max_steps=4,
        inner_check_every=2,
        outer_tol=1e-4,
        warmup_steps=2,
        rewarmup_steps=2,
        rank_capacity=8,
    )
    return AromaConfig(**{**base, **kw})


def run(trainer, state, steps):
    losses, ranks = [], []
    for batch in batches(steps):
        state, info = trainer.step(state, batch)
        losses.append(float(info.loss))
        ranks.append(np.asarray(info.ranks))
    return trainer.finalize(state), np.array(losses), np.array(ranks)


def peft(trainer, state, out):
    artifacts.save_final(out, trainer, state)
    tensors, meta = artifacts.load_final(out)
    return export.peft_files(tensors, meta, lambda p: p.replace("/", "."), "tiny", "CAUSAL_LM", [])


def test_tunix_llama3_einsum_and_linear_layers_found_and_adapted():
    model = tunix_model(layers=1, abstract=True)
    trainer = NnxTrainer(model, nnx_loss, cfg(method="lora", r=2), names=hf_name, donate=False)
    kinds = {p.rsplit("/", 1)[1]: trainer.specs[p].in_ndim for p in trainer.module_paths}
    assert kinds == {"q_proj": 1, "v_proj": 1, "o_proj": 2, "down_proj": 1}  # o: (N, H, D)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(s.dtype), trainer.params)
    state = trainer.init(params)
    x = next(batches(1))

    @jax.jit
    def logits(state):
        with trainer.adapted(state) as tuned:
            return _Logits(tuned)(x["input_ids"], x["attention_mask"]).logits

    zero_b = np.asarray(logits(state))  # b = 0: the adapters add nothing yet
    o = "model/layers/0/self_attn/o_proj"
    pairs = dict(state.adapters.pairs)
    pairs[o] = pairs[o]._replace(b=jnp.ones_like(pairs[o].b))
    one_b = np.asarray(logits(state._replace(adapters=state.adapters._replace(pairs=pairs))))
    assert np.abs(one_b - zero_b).max() > 1e-3, "the einsum layer's adapter counts"


@pytest.mark.slow
def test_tunix_llama3_takes_the_native_linen_aroma_run(tmp_path):
    native = NativeCausalLM(NativeConfig.from_dict(TINY), seed=0)
    model = tunix_model()
    before = jax.tree.map(np.asarray, nnx.state(model))
    trainer = NnxTrainer(model, nnx_loss, cfg(), names=hf_name, donate=False)
    # Same weights: the native params in the NNX layout (q: (D, N*H) -> (D, N, H), ...).
    params = jax.tree.map(lambda v, w: jnp.reshape(w, v.shape), trainer.params, native.params)

    x = next(batches(1))
    ids, mask = jnp.asarray(x["input_ids"]), jnp.asarray(x["attention_mask"])
    base_err = np.abs(
        np.asarray(_Logits(trainer.view.module(params))(ids, mask).logits)
        - np.asarray(native(ids, mask).logits)
    ).max()
    print(f"base logits, tunix NNX vs native linen: max |diff| = {base_err:.2e}")
    assert base_err < 1e-5

    linen_loss, _ = objectives.causal_lm(native)
    linen = AromaTrainer(linen_loss, native.params, cfg(), donate=False)
    assert trainer.paths == linen.paths and len(trainer.paths) == 8
    want_state, want, want_ranks = run(linen, linen.init(native.params), 16)
    got_state, got, ranks = run(trainer, trainer.init(params), 16)
    err = np.abs(got - want).max()
    print(f"AROMA losses, tunix NNX vs native linen: max |diff| = {err:.2e}; ranks {ranks[-1]}")
    assert err < 1e-4 and got[-1] < got[0]
    np.testing.assert_array_equal(ranks, want_ranks)
    assert ranks[-1].max() >= 2, "AROMA merged pairs"
    assert trainer.ranks(got_state) == linen.ranks(want_state)
    assert trainer.compiles == 1

    got_cfg, got_peft = peft(trainer, got_state, tmp_path / "nnx")
    want_cfg, want_peft = peft(linen, want_state, tmp_path / "linen")
    assert got_cfg == want_cfg and got_cfg["rank_pattern"]
    assert sorted(got_peft) == sorted(want_peft)
    for k in want_peft:
        np.testing.assert_allclose(got_peft[k], want_peft[k], atol=1e-4)

    with trainer.adapted(got_state) as tuned:
        tuned_logits = np.asarray(_Logits(tuned)(ids, mask).logits)
    with linen.applied(want_state) as p:
        linen_logits = np.asarray(native(ids, mask, params=p).logits)
    assert np.abs(tuned_logits - linen_logits).max() < 1e-4
    after = jax.tree.map(np.asarray, nnx.state(model))  # tunix's module: untouched
    assert jax.tree.all(jax.tree.map(np.array_equal, before, after))
    assert type(model.layers[0].attn.o_proj).__module__ == "tunix.models.llama3.model"
