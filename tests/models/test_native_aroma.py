"""AROMA on the native LLaMA: the same run as on the fixed HF Flax LLaMA, ``model.impl`` selection,
remat and injection under it, the SmolLM2 asset."""

import numpy as np
import pytest
import transformers
from native_tiny import tiny_config

from aroma_jax import AromaConfig, AromaTrainer
from aroma_jax.data import objectives
from aroma_jax.models import hf
from aroma_jax.models.native import NativeCausalLM, NativeConfig

CFG = tiny_config(max_position_embeddings=32, rope_theta=1e5, tie_word_embeddings=False)


def batches(n, seed=0):
    for i in range(n):
        rng = np.random.default_rng(seed + i % 2)  # two batches in turn: the loss can fall
        ids = rng.integers(3, 64, (4, 16)).astype(np.int32)
        ids[:, 8:] = ids[:, :8]  # a copy task: learnable, so the adapters move
        mask = np.ones_like(ids)
        mask[0, :3] = 0
        loss_mask = np.zeros_like(ids)
        loss_mask[:, 8:] = 1
        yield {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}


def torch_logits(directory, x):
    """Logits of the PyTorch model saved in ``directory`` on batch ``x``."""
    import torch

    pt = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        ids = torch.tensor(x["input_ids"]).long()
        return pt(ids, attention_mask=torch.tensor(x["attention_mask"])).logits.numpy()


def run(model, params, steps=15):
    loss_fn, _ = objectives.causal_lm(model)
    cfg = AromaConfig(
        target_modules=hf.PRESETS["llama"],
        r=1,
        alpha=2.0,
        learning_rate=2e-2,
        max_steps=steps,
        inner_max_steps=5,
        inner_check_every=3,
        outer_tol=1e-4,
        warmup_steps=2,
        rewarmup_steps=2,
    )
    trainer = AromaTrainer(loss_fn, params, cfg, donate=False)
    state = trainer.init(params)
    losses, ranks = [], []
    for batch in batches(steps):
        state, info = trainer.step(state, batch)
        losses.append(float(info.loss))
        ranks.append(np.asarray(info.ranks).tolist())
    return np.asarray(losses), ranks, trainer.paths, trainer, state


@pytest.fixture(scope="module")
def native_run():
    native = NativeCausalLM(NativeConfig.from_dict({**CFG, "model_type": "llama"}))
    return run(native, native.params), native


@pytest.mark.hf4
def test_aroma_run_on_native_equals_fixed_hf_flax_llama():
    from aroma_jax.models.llama import FixedFlaxLlamaForCausalLM

    fixed = FixedFlaxLlamaForCausalLM(transformers.LlamaConfig(**CFG), seed=0)
    native = NativeCausalLM(NativeConfig.from_dict({**CFG, "model_type": "llama"}))
    params = fixed.params  # one param tree serves both: the native paths mirror HF's
    native.params = params
    hf_loss, hf_ranks, hf_paths, _, _ = run(fixed, params)
    nat_loss, nat_ranks, nat_paths, _, _ = run(native, params)
    print(
        f"max |loss native - loss hf| over {len(hf_loss)} steps: "
        f"{np.abs(nat_loss - hf_loss).max():.2e}; final ranks {nat_ranks[-1]}"
    )
    assert nat_paths == hf_paths and len(nat_paths) == 10
    assert nat_ranks == hf_ranks
    assert max(hf_ranks[-1]) >= 1  # outer steps merged something: the comparison has teeth
    np.testing.assert_allclose(nat_loss, hf_loss, atol=1e-5, rtol=0)
    assert hf_loss[-1] < hf_loss[0]


def test_merged_export_of_a_native_run_loads_in_pytorch(native_run, tmp_path):
    """`aroma-jax export --merged` for native runs: merged weights, PyTorch-layout safetensors."""
    from aroma_jax.train import artifacts
    from aroma_jax.train.export import merged_params, save_pytorch_weights

    (losses, ranks, _, trainer, state), native = native_run
    assert losses[-1] < losses[0]
    final = trainer.finalize(state)
    artifacts.save_final(tmp_path / "final", trainer, final)
    tensors, meta = artifacts.load_final(tmp_path / "final")
    merged = merged_params(native.params, tensors, meta)
    assert save_pytorch_weights(native, merged, tmp_path / "merged") is None  # not needed
    native.save_pretrained(tmp_path / "merged", params=merged)
    x = next(batches(1))
    with trainer.applied(final) as p:
        want = np.asarray(native(x["input_ids"], x["attention_mask"], params=p).logits)
    got = torch_logits(tmp_path / "merged", x)
    valid = x["attention_mask"].astype(bool)
    assert max(ranks[-1]) >= 1
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-4)


def test_remat_keeps_adapter_gradients():
    """Adapters inject through nn.remat: the same loss and adapter gradients as without it."""
    import jax

    cfg = NativeConfig.from_dict({**CFG, "model_type": "llama"})
    plain = NativeCausalLM(cfg)
    batch = next(batches(1))
    out = {}
    for remat in ("none", "full", "dots"):
        loss_fn, _ = objectives.causal_lm(NativeCausalLM(cfg, params=plain.params, remat=remat))
        trainer = AromaTrainer(loss_fn, plain.params, AromaConfig(target_modules=("q_proj",)))
        state = trainer.init(plain.params)
        pairs = jax.tree.map(lambda x: x + 0.1, state.adapters.pairs)  # b != 0: non-zero grads

        def f(pairs, state=state, trainer=trainer, loss_fn=loss_fn):
            s = state._replace(adapters=state.adapters._replace(pairs=pairs))
            with trainer.applied(s) as params:
                return loss_fn(params, batch, None)

        out[remat] = jax.jit(jax.value_and_grad(f))(pairs)
    for remat in ("full", "dots"):
        np.testing.assert_allclose(out[remat][0], out["none"][0], rtol=1e-6)
        grads, want = jax.tree.leaves(out[remat][1]), jax.tree.leaves(out["none"][1])
        for g1, g2 in zip(grads, want, strict=True):
            assert float(np.abs(g2).max()) > 0
            np.testing.assert_allclose(g1, g2, atol=1e-6)


def test_impl_selection(fake_assets, tmp_path):
    from aroma_jax.data import tasks

    task = tasks.limit(tasks.get_task("rotten_tomatoes", seed=0), 32, 8)
    assert isinstance(hf.load_for_task("tiny-llama", task).model, NativeCausalLM)
    qwen = hf.load_for_task("tiny-qwen2", task)
    assert qwen.arch == "llama" and qwen.model.config.qkv_bias
    with pytest.raises(ValueError, match="model.impl=native runs"):
        (tmp_path / "config.json").write_text('{"model_type": "t5"}')
        hf.load_for_task(str(tmp_path), task, impl="native")
    with pytest.raises(ValueError, match="accepted"):
        hf.load_for_task("tiny-llama", task, impl="jax")
    # model.scan_layers (auto: scanned) and model.remat reach the native model
    scanned = hf.load_for_task("tiny-llama", task, remat="full")
    assert scanned.model.scan_layers and scanned.model.module.remat == "full"
    assert scanned.stacked == {"model/layers": scanned.model.config.num_hidden_layers}
    unrolled = hf.load_for_task("tiny-llama", task, scan_layers=False)
    assert not unrolled.model.scan_layers and unrolled.stacked == {}
    with pytest.raises(ValueError, match="model.remat='full' needs a native model"):
        hf.load_for_task("tiny-llama", task, impl="hf", remat="full")


@pytest.mark.hf4
def test_impl_hf_builds_the_fixed_flax_class(fake_assets):
    from aroma_jax.data import tasks
    from aroma_jax.models.llama import FixedFlaxLlamaForCausalLM

    task = tasks.limit(tasks.get_task("rotten_tomatoes", seed=0), 32, 8)
    fixed = hf.load_for_task("tiny-llama", task, impl="hf").model
    assert isinstance(fixed, FixedFlaxLlamaForCausalLM)


def test_impl_hf_without_flax_classes_says_what_to_do(fake_assets, monkeypatch):
    """On transformers 5 (no Flax classes) ``model.impl=hf`` is a one-line error naming the
    way out, not an AttributeError inside transformers."""
    from aroma_jax.data import tasks

    monkeypatch.setattr(hf, "hf_flax_available", lambda: False)
    task = tasks.limit(tasks.get_task("rotten_tomatoes", seed=0), 32, 8)
    with pytest.raises(hf.ModelLoadError, match=r"model.impl=auto or native.*aroma-jax\[hf4\]"):
        hf.load_for_task("tiny-llama", task, impl="hf")


@pytest.mark.hf4
def test_native_loads_hf_flax_msgpack_like_the_smollm2_asset(tmp_path):
    """SmolLM2 assets converted before the native models are HF Flax checkpoints
    (flax_model.msgpack, tied embeddings): the native model loads them and computes the fixed
    HF model's logits."""
    from aroma_jax.models.llama import FixedFlaxLlamaForCausalLM

    cfg = transformers.LlamaConfig(**{**CFG, "tie_word_embeddings": True})
    fixed = FixedFlaxLlamaForCausalLM(cfg, seed=1)
    fixed.save_pretrained(tmp_path)
    native = NativeCausalLM.from_pretrained(tmp_path)
    x = next(batches(1))
    want = np.asarray(fixed(x["input_ids"], x["attention_mask"]).logits)
    got = np.asarray(native(x["input_ids"], attention_mask=x["attention_mask"]).logits)
    valid = x["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-5)


@pytest.mark.slow
def test_scanned_native_run_equals_the_unrolled_run_and_exports(tmp_path):
    """Layers under nn.scan with stacked adapters: the same run as the unrolled native model
    (one target kind and a full reset, so both draw the same random numbers in the same order),
    then the saved artefact rebuilds the state and the merged export loads in PyTorch."""
    from aroma_jax.models.native import stack_layers
    from aroma_jax.train import artifacts
    from aroma_jax.train.export import merged_params

    unrolled = NativeCausalLM(NativeConfig.from_dict({**CFG, "model_type": "llama"}))
    scanned = NativeCausalLM(
        unrolled.config, params=stack_layers(unrolled.params, 2), scan_layers=True
    )
    cfg = AromaConfig(
        target_modules=("v_proj",),
        r=1,
        alpha=2.0,
        learning_rate=2e-2,
        max_steps=15,
        inner_max_steps=5,
        inner_check_every=3,
        outer_tol=1e-4,
        warmup_steps=2,
        rewarmup_steps=2,
        reset="full",
    )
    runs = []
    for model, stacked in ((unrolled, None), (scanned, hf.stacked_of(scanned))):
        loss_fn, _ = objectives.causal_lm(model)
        trainer = AromaTrainer(loss_fn, model.params, cfg, donate=False, stacked=stacked)
        state = trainer.init(model.params)
        losses, ranks = [], []
        for batch in batches(cfg.max_steps):
            state, info = trainer.step(state, batch)
            losses.append(float(info.loss))
            ranks.append(np.asarray(info.ranks).tolist())
        runs.append((np.asarray(losses), ranks, trainer, state))
    (u_loss, u_ranks, u_tr, _), (s_loss, s_ranks, s_tr, s_state) = runs
    assert s_tr.module_paths == ("model/layers/self_attn/v_proj",)
    assert s_tr.paths == u_tr.paths and s_tr.compiles == 1
    assert s_ranks == u_ranks and max(s_ranks[-1]) >= 1
    np.testing.assert_allclose(s_loss, u_loss, atol=1e-5, rtol=0)

    final = s_tr.finalize(s_state)
    artifacts.save_final(tmp_path / "final", s_tr, final)
    rebuilt = artifacts.rebuild_state(s_tr, scanned.params, tmp_path / "final")
    x = next(batches(1))
    with s_tr.applied(final) as p:
        want = np.asarray(scanned(x["input_ids"], x["attention_mask"], params=p).logits)
    with s_tr.applied(rebuilt) as p:
        again = np.asarray(scanned(x["input_ids"], x["attention_mask"], params=p).logits)
    np.testing.assert_allclose(again, want, atol=1e-5)
    tensors, meta = artifacts.load_final(tmp_path / "final")
    assert meta["paths"] == list(u_tr.paths)  # per-layer names, as an unrolled run writes
    merged = merged_params(scanned.params, tensors, meta)
    scanned.save_pretrained(tmp_path / "merged", params=merged)
    got = torch_logits(tmp_path / "merged", x)
    valid = x["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-4)
